"""Decoder-only or encoder-decoder: the one place where a policy's architecture decides which code
loads and runs it. A model's config says which it is (`is_encoder_decoder`: T5, CodeT5, BART, ...).

- `auto_class`: the `transformers` class that loads it (`models`, `trainer` checkpoints);
- `implementation`: the module that encodes, samples and scores it (`policy` hands over to it):
  `cosmocore.policy.causal` or `cosmocore.policy.seq2seq`, with the same functions and the same contracts.
"""

from __future__ import annotations

from types import ModuleType


def is_encoder_decoder(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def auto_class(config):
    import transformers

    return transformers.AutoModelForSeq2SeqLM if is_encoder_decoder(config) else transformers.AutoModelForCausalLM


def implementation(config) -> ModuleType:
    if is_encoder_decoder(config):
        from cosmocore.policy import seq2seq

        return seq2seq
    from cosmocore.policy import causal

    return causal
