"""The reward table of `params.yaml`'s `reward` section, as one pure function."""

from __future__ import annotations

import math

from cosmocore.config import RewardConfig


def reward_for(outcome: str, hallucinated: bool, test_share: float, cfg: RewardConfig) -> float:
    """Scalar reward of one executed sample.

    The outcome class picks the base value; a wrong answer earns the share of tests passed (scaled by
    the pass reward) when `use_test_share` is on and the test format reports it; the hallucination
    flag adds its penalty on top; the sum is clipped to [-1, 1].

    >>> from cosmocore.config import load_params
    >>> cfg = load_params().reward
    >>> reward_for("passed", False, float("nan"), cfg)
    1.0
    >>> reward_for("wrong_answer", False, 0.5, cfg)
    0.5
    >>> reward_for("runtime_error", True, float("nan"), cfg)
    -1.0
    """
    base = getattr(cfg, outcome)
    if outcome == "wrong_answer" and cfg.use_test_share and not math.isnan(test_share):
        base = max(base, test_share * cfg.passed)
    if hallucinated:
        base += cfg.hallucination_penalty
    return float(min(1.0, max(-1.0, base)))
