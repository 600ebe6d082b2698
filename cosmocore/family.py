"""The one place where a policy's architecture decides which code runs it: `implementation` is the
module that encodes, samples and scores it (`policy` hands over to it). Decoder-only models are the
only kind so far: `cosmocore.causal`.
"""

from __future__ import annotations

from types import ModuleType


def implementation(config) -> ModuleType:
    from cosmocore import causal

    return causal
