"""Shared fixtures: the resolved default config and tiny models (decoder-only, encoder-decoder) built from a config."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def outer_timeout(seconds: int, message: str):
    """Raise TimeoutError(message) after `seconds` (SIGALRM): the outer timeout that turns a hostile or
    load test which escapes containment into a failure instead of a hung suite."""
    def expire(signum, frame):
        raise TimeoutError(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def config():
    from cosmocore.config import load_params

    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, config):
    """A two-layer Llama with the embedded model's tokenizer, materialised like the smoke profile's."""
    from cosmocore.policy.models import materialise

    cfg = config.model.model_copy(update={"source": "tiny"})
    return materialise(cfg, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, config):
    """A two-layer T5 (CodeT5-small's architecture) with the embedded model's tokenizer and no chat template,
    built from a config and then materialised as a local folder is (`model.source: <folder>`)."""
    from cosmocore.policy.models import materialise

    built = materialise(config.model.model_copy(update={"source": "tiny", "tiny_arch": "t5"}), tmp_path_factory.mktemp("t5"))
    return materialise(config.model.model_copy(update={"source": str(built)}), tmp_path_factory.mktemp("t5-copied"))
