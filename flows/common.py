"""Small helpers shared by the flows: paths, JSON output and logging set-up."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from cosmocore.errors import CosmoCoreError
from cosmocore.logs import setup_logging

CONFIG_DIR = Path("data/config")
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)
    return path


def file_digest(*paths: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def run_main(main: Callable[[], object]) -> None:
    """Run a flow's entry point; a user-fixable error ends it with one line and status 2."""
    setup_logging("%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        main()
    except CosmoCoreError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have this process get `sig` when the process that started it dies, even by SIGKILL, which no exit
    handler sees (Linux; elsewhere exit handlers alone stop it): a child's `preexec_fn`, or called first
    thing by a process that its launcher started in a session of its own."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, sig)
