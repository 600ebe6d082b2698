"""Small helpers shared by the flows: paths, JSON output and logging set-up."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
from pathlib import Path
from typing import Callable

from cosmocore.errors import CosmoCoreError

CONFIG_DIR = Path("data/config")
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "alembic", "mlflow", "urllib3", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("cosmocore").setLevel(logging.INFO)  # Prefect sets the root logger to WARNING


def run_main(main: Callable[[], object]) -> None:
    """Run a flow's entry point; a user-fixable error ends it with one line and status 2."""
    setup_logging()
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
