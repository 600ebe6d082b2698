"""Small helpers shared by the flows: the config folder, the entry point's error handling, ending with the parent."""

from __future__ import annotations

import ctypes
import signal
import sys
from pathlib import Path
from typing import Callable

from cosmocore.errors import CosmoCoreError
from cosmocore.logs import setup_logging

CONFIG_DIR = Path("data/config")
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


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
