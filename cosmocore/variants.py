"""Every variant in one table: what differs between them (how the buffer stores and serves samples, the
advantage baseline, CodeRL+ alignment, their part in the report), read by config validation, the buffer,
the loop, the trainer's set-up, the report and the learning benchmark. A new variant is one entry of
`REGISTRY` (and its test); nothing else lists variants.

Every variant goes through the same clipped-ratio policy-gradient update (`trainer.Learner`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Serving:
    """How a variant fills and serves the buffer, and which baseline its advantages are taken against.

    sampling: `in_order` (only the latest batch, each entry served once per pass), `uniform`,
    `priority` (∝ p^α over everything), `dream_mix` (the CosmoCore 80/20 mix, with gates), and two
    on-policy schemes that recent work reports working for RL on code and math:
      - `difficulty`: only the latest batch, each slot drawn in proportion to its task's reward
        variance in that batch, p(1−p) for pass/fail rewards (online difficulty filtering: Bae et al.
        2025, "Online Difficulty Filtering for Reasoning Oriented Reinforcement Learning"; DAPO's
        dynamic sampling drops the zero-variance groups outright). Groups that all score alike carry no
        group-relative gradient and are never drawn.
      - `success_replay`: the latest batch in order, plus `buffer.success_replay_share` × B more rows per
        minibatch drawn uniformly from successes kept from earlier batches on hard tasks (those of
        which at most `buffer.success_max_pass_rate` of the samples passed): ExGRPO (Zhan et al. 2025,
        "ExGRPO: Learning to Reason from Experience") and RePO (Li et al. 2025, "RePO: Replay-Enhanced
        Policy Optimization"), which replay a weak policy's rare successes so that they are not lost.
    drop_pruned: whether the Prune Bin is deleted (True) or kept in the regular pool.
    baseline: what the advantage `reward − baseline` subtracts (`loop.set_baselines`):
      - `expected`: the task's running mean reward (the affect tagger's E_t), refreshed before every
        nocturnal phase, so a replayed entry is judged against what the policy now expects of its task
        (a Dream Queue failure keeps a negative advantage); the critic V(s) takes over once it explains
        `train.critic_min_explained_variance` of the reward's variance (`trainer.Learner`).
      - `group`: the mean reward of the other samples of the same task in the same iteration, GRPO's
        group-relative advantage (Shao et al. 2024, DeepSeekMath; TRL's GRPOTrainer, verl), without the
        division by the group's standard deviation (Dr. GRPO, Liu et al. 2025): a group whose samples
        all score alike gives no gradient.
      - `negative`: max(reward, 0), so the advantage is min(reward, 0): negative-sample reinforcement
        (NSR, Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM
        Reasoning"), which only pushes failures down and leaves the rest of the distribution alone.
    """

    sampling: Literal["in_order", "uniform", "priority", "dream_mix", "difficulty", "success_replay"]
    drop_pruned: bool = False
    baseline: Literal["expected", "group", "negative"] = "expected"

    @property
    def on_policy(self) -> bool:
        """Whether each phase serves the latest batch (each entry once), not a store of older ones."""
        return self.sampling in ("in_order", "difficulty", "success_replay")


@dataclass(frozen=True)
class Variant:
    """One arm: its `Serving` rule, whether CodeRL+ alignment questions are mixed into its iterations
    (at `alignment.share`, one buffer per kind: `mixing.KindMix`), and whether the report compares
    CosmoCore against it (`control`)."""

    serving: Serving
    alignment: bool = False
    control: bool = False

    @property
    def use_critic(self) -> bool:
        """Whether a value head is fitted: only the running-mean baseline hands over to a critic."""
        return self.serving.baseline == "expected"


REGISTRY: dict[str, Variant] = {
    "on_policy": Variant(Serving("in_order"), control=True),
    "grpo": Variant(Serving("in_order", baseline="group"), control=True),
    "nsr": Variant(Serving("in_order", baseline="negative"), control=True),
    "difficulty": Variant(Serving("difficulty", baseline="group"), control=True),
    "success_replay": Variant(Serving("success_replay", baseline="group"), control=True),
    "per": Variant(Serving("priority"), control=True),
    "uniform": Variant(Serving("uniform"), control=True),
    "cosmocore": Variant(Serving("dream_mix", drop_pruned=True)),
    "cosmocore_no_prune": Variant(Serving("dream_mix", drop_pruned=False)),
    "coderl_plus": Variant(Serving("in_order"), alignment=True),
    "cosmocore_coderl_plus": Variant(Serving("dream_mix", drop_pruned=True), alignment=True),
}
VARIANTS = tuple(REGISTRY)
ALIGNMENT_VARIANTS = tuple(name for name, variant in REGISTRY.items() if variant.alignment)
