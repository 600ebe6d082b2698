"""The logging set-up of the command and the flows: our loggers at INFO, the libraries' at WARNING, even
great_expectations' logger that sets its own level to INFO when imported."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import logging
from cosmocore.logs import GX_SELF_LEVELLED, setup_logging

setup_logging("%(name)s %(levelname)s %(message)s")
setup_logging("%(name)s %(levelname)s %(message)s")
logging.getLogger("cosmocore.rl.rollout").info("own info")
logging.getLogger("flows.train").info("flow info")
logging.getLogger("some_library").info("library info")
logging.getLogger("some_library").warning("library warning")
gx = logging.getLogger(GX_SELF_LEVELLED)
gx.setLevel(logging.INFO)  # as great_expectations does when imported, after the set-up
gx.info("gx info")
gx.warning("gx warning")
"""


def test_own_loggers_say_info_and_libraries_only_warnings():
    # a fresh process: the set-up configures the root logger once per process, and pytest's handlers are on it here
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "cosmocore.rl.rollout INFO own info",
        "flows.train INFO flow info",
        "some_library WARNING library warning",
        "great_expectations.data_context.types.base WARNING gx warning",
    ]
