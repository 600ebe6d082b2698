"""What the rest of the pipeline asks of a policy, whatever its architecture: encode a prompt, sample
completions, and score completions (per-token log-probs, mean entropy and a pooled hidden state) in one
forward pass. Rollouts score to record the behaviour policy; the trainer scores (with gradients) the
current one, so both see exactly the same numbers for the same weights.

Each function hands over to the policy's architecture (`family.implementation`): `cosmocore.policy.causal`
for decoder-only models, `cosmocore.policy.seq2seq` for encoder-decoder ones. Both build their results with
`scores.token_scores`, so the numbers are defined once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cosmocore.config import RolloutConfig
from cosmocore.policy.family import implementation
from cosmocore.policy.scores import Scored


def encode(model, tokenizer, text: str, answer_prefix: str = "") -> list[int]:
    """Token ids of a prompt, ending with `answer_prefix`: the start of an answer, written for the model,
    which it continues (and is not trained on)."""
    return implementation(model.config).encode(model, tokenizer, text, answer_prefix)


def generate_inputs(model, prompt_ids: list[int]) -> dict:
    """`model.generate`'s inputs for one prompt written by `encode` (the rollout benchmark's baseline)."""
    return implementation(model.config).generate_inputs(model, prompt_ids)


def score(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, temperature: float = 1.0) -> Scored:
    """Score completions under `model` (gradients flow when enabled by the caller)."""
    return implementation(model.config).score(model, prompt_ids, completion_ids, pad_id, temperature)


def score_for_update(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                     temperature: float) -> tuple[Scored, torch.Tensor]:
    """The trainer's pass: the values of `score`, with gradients, plus the state the critic judges, the
    last hidden state just before the policy's first token (a value that saw the completion could
    predict its reward and cancel the advantage)."""
    return implementation(model.config).score_for_update(model, prompt_ids, completion_ids, pad_id, temperature)


def stream(model, tokenizer, groups: list[tuple[list[int], int]], cfg: RolloutConfig, style: str, greedy: bool,
           temperature: float, with_scores: bool, capacity: int, stop: Callable[[str], bool] | None = None):
    """Sample completions for `groups` (prompt ids, rows), up to `capacity` rows at a time; yields
    (group index, member, `sampling.Sampled`) as rows finish, their behaviour log-probs, entropies and
    pooled hidden state those `score` gives."""
    return implementation(model.config).stream(model, tokenizer, groups, cfg, style, greedy, temperature, with_scores,
                                               capacity, stop)
