"""Logging set-up for the `cosmocore` command and the flows: our own loggers (`cosmocore.*`, `flows.*`)
at INFO, every other library's at WARNING, so that a run's log holds what the pipeline reports and what
goes wrong, not what the libraries it imports say about themselves."""

from __future__ import annotations

import logging
import os

OWN = ("cosmocore", "flows")
# great_expectations sets this module's logger to INFO when it is imported (lazily, by `cosmocore.data.validation`),
# over any level set beforehand; it logs "Created temporary directory ..." at every validation
GX_SELF_LEVELLED = "great_expectations.data_context.types.base"


def _warnings_and_above(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def setup_logging(fmt: str) -> None:
    """Configure the root logger with `fmt` at WARNING (unless something already has), our own loggers at
    INFO. Repeated calls change nothing more."""
    logging.basicConfig(level=logging.WARNING, format=fmt)
    for name in OWN:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger(GX_SELF_LEVELLED).addFilter(_warnings_and_above)
    # MLflow gives its loggers their own handler and the level this names (INFO when unset) when it is
    # imported (lazily, by `flows.tracking`); a level the user chose stands
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
