"""The replay buffer of the nocturnal phase: a sum tree, the affect gates and the variants' serving rules.

Gates (docs/design.md, "Trajectories, rewards and affect"), applied to each trajectory as it is added:

- **Dream Queue**: `v < dream_valence and a > dream_arousal` — painful, surprising failures ("cringe").
- **Prune Bin**: `|v| < prune_valence and a < prune_arousal` — routine, unsurprising outcomes. Its
  entries are deleted unless the policy's mean entropy on that sample exceeds `prune_entropy` (the
  *entropy exception*: a policy still unsure of what it wrote is exploring, so the sample is kept, in
  the regular pool). `cosmocore_no_prune` keeps the whole Prune Bin in the regular pool.
- **regular pool**: everything else.

`prune_valence` moves at run time (`ReplayBuffer.tune_pruning`): when the critic's value estimates barely
vary the policy has little left to learn from routine samples, so the prune band widens.

Sampling: every variant goes through `ReplayBuffer.sample`; they differ only in what is stored and how
it is drawn (`variants.Serving`, one per variant in `variants.REGISTRY`). The CosmoCore mix draws each minibatch slot from the Dream Queue, in proportion
to `p^α` with `p = |TD| + λ·|v|·a`, with probability `dream_fraction`, and otherwise uniformly over the
whole buffer. Importance-sampling weights correct for that mixed distribution:
`w_i = (N·P(i))^-β / max_j (N·P(j))^-β = (P_min / P(i))^β`, with β annealed from `beta_start` to 1.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from cosmocore.config import BufferConfig
from cosmocore.errors import CosmoCoreError
from cosmocore.files import atomic_path
from cosmocore.variants import REGISTRY, VARIANTS

GATES = ("dream", "regular", "pruned")
DREAM, REGULAR, PRUNED = range(len(GATES))
EMPTY = -1  # gate code of a slot that holds nothing
FORMAT_VERSION = 1
T = TypeVar("T")


class SumTree:
    """Array-backed binary sum tree (plus a min tree) over `capacity` non-negative priorities.

    Node 1 is the root, node k has children 2k and 2k+1, and leaf i lives at node `leaves + i`, with
    `leaves` the capacity rounded up to a power of two so that every leaf sits at the same depth. Batched
    `update` and `sample` walk all their indices level by level with numpy, so a batch of n costs
    O(log capacity) numpy calls, not O(n log capacity) Python steps. The min tree ignores zero leaves
    (they cannot be drawn), which is what importance-sampling normalisation needs.

    Two shortcuts keep the numpy-call count low where a level is narrow: `update` recomputes a level
    no wider than `WHOLE_LEVEL_RATIO` × the batch whole, with two contiguous calls instead of a gather
    and a scatter per tree; `sample` starts its descent with one `searchsorted` over the cumulative sums
    of level `JUMP_LEVEL` (4096 nodes), which replaces twelve descent steps. Both cost O(1) extra per batch.
    """

    WHOLE_LEVEL_RATIO = 8
    JUMP_LEVEL = 12

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"SumTree capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._leaves = 1 << (capacity - 1).bit_length()
        self._depth = self._leaves.bit_length() - 1
        self._sum = np.zeros(2 * self._leaves)
        self._min = np.full(2 * self._leaves, np.inf)

    @property
    def total(self) -> float:
        return float(self._sum[1])

    @property
    def min(self) -> float:
        """Smallest positive priority (inf when all are zero)."""
        return float(self._min[1])

    @property
    def nbytes(self) -> int:
        return self._sum.nbytes + self._min.nbytes

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        return self._sum[np.asarray(indices) + self._leaves]

    def update(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set leaves `indices` to `priorities` and recompute their ancestors.

        Parents are recomputed from their two children rather than shifted by a delta, so rounding
        errors never accumulate and a leaf repeated in `indices` (numpy keeps the last of its values)
        leaves every ancestor consistent with it.
        """
        indices = np.asarray(indices, dtype=np.int64)
        priorities = np.asarray(priorities, dtype=np.float64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.capacity):
            raise IndexError(f"SumTree indices must lie in [0, {self.capacity}), got {indices.min()}..{indices.max()}")
        if not np.all(priorities >= 0) or not np.isfinite(priorities.sum()):
            raise ValueError("SumTree priorities must be finite and non-negative")
        nodes = indices + self._leaves
        self._sum[nodes] = priorities
        self._min[nodes] = np.where(priorities > 0, priorities, np.inf)
        width = self._leaves
        while width > 1:
            width >>= 1  # the parents' level: nodes width .. 2·width − 1
            if width <= self.WHOLE_LEVEL_RATIO * len(nodes):
                children = slice(2 * width, 4 * width, 2), slice(2 * width + 1, 4 * width, 2)
                np.add(self._sum[children[0]], self._sum[children[1]], out=self._sum[width : 2 * width])
                np.minimum(self._min[children[0]], self._min[children[1]], out=self._min[width : 2 * width])
            else:
                nodes >>= 1
                left = nodes << 1
                right = left + 1
                self._sum[nodes] = self._sum[left] + self._sum[right]
                self._min[nodes] = np.minimum(self._min[left], self._min[right])

    def sample(self, n: int, rng: np.random.Generator, stratified: bool = True) -> np.ndarray:
        """Draw `n` leaf indices with probability priority / total.

        Stratified draws put one uniform in each of n equal slices of the total mass (lower variance,
        and sorted indices, which walk the tree cache-friendly); plain draws are independent.
        """
        if not self.total > 0:
            raise ValueError("cannot sample from a SumTree whose priorities are all zero")
        jump = min(self.JUMP_LEVEL, self._depth)
        level = self._sum[1 << jump : 2 << jump]
        cumulative = np.cumsum(level)
        uniforms = rng.random(n)
        if stratified:
            uniforms = (np.arange(n) + uniforms) / n
        mass = uniforms * cumulative[-1]
        position = np.minimum(np.searchsorted(cumulative, mass, side="right"), len(level) - 1)
        mass -= cumulative[position] - level[position]
        nodes = position + (1 << jump)
        for _ in range(self._depth - jump):
            nodes <<= 1
            left_mass = self._sum[nodes]
            go_right = mass >= left_mass
            np.subtract(mass, left_mass, out=mass, where=go_right)
            nodes += go_right
        leaves = nodes - self._leaves
        # Float rounding can, within a few ulps of a boundary, walk into an all-zero subtree. Such
        # draws (probability ~1e-16 each) are redrawn, which leaves the distribution exact.
        empty = self._sum[nodes] <= 0
        if empty.any():
            leaves[empty] = self.sample(int(empty.sum()), rng, stratified=False)
        return leaves

    def clear(self) -> None:
        self._sum.fill(0.0)
        self._min.fill(np.inf)


def _gate_codes(valence: ArrayLike, arousal: ArrayLike, cfg: BufferConfig, prune_valence: float | None = None) -> np.ndarray:
    valence, arousal = (np.asarray(x, dtype=np.float64) for x in (valence, arousal))
    band = cfg.prune_valence if prune_valence is None else prune_valence
    dream = (valence < cfg.dream_valence) & (arousal > cfg.dream_arousal)
    pruned = (np.abs(valence) < band) & (arousal < cfg.prune_arousal)
    return np.where(dream, DREAM, np.where(pruned, PRUNED, REGULAR)).astype(np.int8)


def gate(valence: ArrayLike, arousal: ArrayLike, cfg: BufferConfig, prune_valence: float | None = None) -> np.ndarray:
    """Gate name per trajectory ("dream", "regular" or "pruned"), by the strict inequalities above.

    A NaN valence or arousal fails every comparison, so an untagged trajectory lands in the regular pool.
    """
    return np.asarray(GATES)[_gate_codes(valence, arousal, cfg, prune_valence)]




@dataclass
class Batch:
    """A minibatch: buffer slots, their entries, normalised IS weights, and which draws came from the Dream Queue.

    `max_weight` is what the weights were normalised by: `(N·P_min)^-β`, the unnormalised weight of the
    least likely entry, so `is_weights · max_weight = (N·P(i))^-β`. A buffer made of several buffers
    (`mixing.KindMix`) needs it to put its parts' weights on one scale.
    """

    indices: np.ndarray
    entries: list[Any]
    is_weights: np.ndarray
    from_dream: np.ndarray
    max_weight: float = 1.0

    def __len__(self) -> int:
        return len(self.indices)


class BufferFileError(CosmoCoreError, ValueError):
    """A buffer file that is missing, truncated or not a buffer."""


class ReplayBuffer:
    """Fixed-capacity replay over opaque entries (trajectory records), served as the variant says.

    Slots `0 .. len(self) - 1` are always the occupied ones, so uniform draws are one `integers` call.

    Eviction rule, when an add would exceed `capacity`: the oldest regular-pool entries go first, then
    the oldest Dream Queue entries. The incoming batch takes part in that order too (it is the newest),
    so when the buffer is full of Dream Queue entries a new regular entry is the first to go.

    Priorities: `p = |TD| + λ·|v|·a + ε` for the CosmoCore variants, `|TD| + ε` otherwise; an entry
    added without a TD error gets the largest |TD| seen so far (0 before the first update), the usual
    PER rule that lets fresh entries be replayed as eagerly as any stored one.
    """

    def __init__(self, cfg: BufferConfig, variant: str, seed: int) -> None:
        if variant not in REGISTRY:
            raise ValueError(f"unknown buffer variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
        self.cfg = cfg
        self.variant = variant
        self.serving = REGISTRY[variant].serving
        self.rng = np.random.default_rng(seed)
        self.tree = SumTree(cfg.capacity)
        self.prune_valence = cfg.prune_valence
        capacity = cfg.capacity
        self._entries: list[Any] = [None] * capacity
        self._gate = np.full(capacity, EMPTY, dtype=np.int8)
        self._valence = np.zeros(capacity)
        self._arousal = np.zeros(capacity)
        self._order = np.zeros(capacity, dtype=np.int64)  # insertion sequence number, for eviction
        self._size = 0
        self._n_dream = 0
        self._next_order = 0
        self._max_td = 0.0
        self._served = 0  # in_order: entries of the latest batch served so far
        self._counters = dict.fromkeys(
            ("added", "pruned", "evicted", "dream_draws", "rest_draws", "dream_exposure", "rest_exposure", "replayed"), 0
        )
        self._retain = np.zeros(capacity, dtype=bool)  # success_replay: kept after its batch
        self._batch_start = 0  # insertion number of the latest batch's first entry

    def __len__(self) -> int:
        return self._size

    @property
    def priority_nbytes(self) -> int:
        """Memory of the priority structures (the sum and min trees)."""
        return self.tree.nbytes

    def entries(self) -> list[Any]:
        """The stored entries, slot by slot (e.g. to find the trajectories that human labels refer to)."""
        return self._entries[: self._size]

    # ---- filling --------------------------------------------------------------------------------

    def add(
        self,
        entries: list[Any],
        valence: ArrayLike,
        arousal: ArrayLike,
        entropy: ArrayLike,
        td: ArrayLike | None = None,
        variance: ArrayLike | None = None,
        retain: ArrayLike | None = None,
    ) -> dict:
        """Gate and store `entries`; returns this add's gate counts and shares, and what was dropped.

        `dream`/`regular`/`pruned` are the gates' verdicts whatever the variant (so gate shares are
        comparable across variants); `spared` counts Prune Bin entries the entropy exception keeps;
        `stored`, `dropped_pruned` and `evicted` say what the variant did. `variance` (each entry's task
        reward variance in this batch) is what `difficulty` draws by; `retain` marks the entries that
        `success_replay` keeps after their batch.
        """
        n = len(entries)
        valence, arousal, entropy = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (valence, arousal, entropy))
        td = np.full(n, self._max_td) if td is None else np.abs(np.asarray(td, dtype=np.float64).reshape(-1))
        variance = np.zeros(n) if variance is None else np.asarray(variance, dtype=np.float64).reshape(-1)
        retain = np.zeros(n, dtype=bool) if retain is None else np.asarray(retain, dtype=bool).reshape(-1)
        if not all(len(x) == n for x in (valence, arousal, entropy, td, variance, retain)):
            raise ValueError(
                f"add: {n} entries but valence/arousal/entropy/td have lengths "
                f"{len(valence)}/{len(arousal)}/{len(entropy)}/{len(td)}"
            )
        verdict = _gate_codes(valence, arousal, self.cfg, self.prune_valence)
        counts = {name: int(np.count_nonzero(verdict == code)) for code, name in enumerate(GATES)}
        stats: dict[str, float] = {**counts, **{f"{name}_share": counts[name] / max(n, 1) for name in GATES}}
        spared = (verdict == PRUNED) & (entropy > self.cfg.prune_entropy)  # the entropy exception (NaN: none)
        stats["spared"] = int(np.count_nonzero(spared))

        if self.serving.sampling in ("in_order", "difficulty"):
            self._clear()  # on-policy: only the latest batch exists
        elif self.serving.sampling == "success_replay":
            self._keep(self._retain[: self._size])  # the latest batch, and the successes kept from earlier ones
        self._batch_start = self._next_order
        stored_gate = verdict.copy()
        if self.serving.sampling != "dream_mix":
            stored_gate[:] = REGULAR
        stored_gate[stored_gate == PRUNED] = REGULAR  # cosmocore_no_prune keeps the Prune Bin as regular
        kept = np.flatnonzero(~((verdict == PRUNED) & ~spared & self.serving.drop_pruned))
        order = self._next_order + np.arange(n)
        self._next_order += n

        freed, survivors = self._evict(kept, stored_gate, order)
        slots = np.concatenate([freed, np.arange(self._size, self._size + len(survivors) - len(freed))])
        self._size += len(survivors) - len(freed)
        for slot, row in zip(slots, survivors):
            self._entries[slot] = entries[row]
        self._gate[slots] = stored_gate[survivors]
        self._valence[slots] = valence[survivors]
        self._arousal[slots] = arousal[survivors]
        self._order[slots] = order[survivors]
        self._retain[slots] = retain[survivors]
        if self.serving.sampling == "difficulty":
            self.tree.update(slots, variance[survivors])
        self._set_priority(slots, td[survivors])
        self._n_dream = int(np.count_nonzero(self._gate[: self._size] == DREAM))

        evicted = len(freed) + len(kept) - len(survivors)
        self._counters["added"] += n
        self._counters["pruned"] += n - len(kept)
        self._counters["evicted"] += evicted
        stats.update(
            stored=len(survivors), dropped_pruned=n - len(kept), evicted=evicted, prune_valence=self.prune_valence
        )
        return stats

    def _evict(
        self, incoming: np.ndarray, incoming_gate: np.ndarray, order: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply the eviction rule; returns the freed slots and the incoming rows that survive."""
        overflow = self._size + len(incoming) - self.cfg.capacity
        if overflow <= 0:
            return np.empty(0, dtype=np.int64), incoming
        stored = np.arange(self._size)
        is_dream = np.concatenate([self._gate[stored] == DREAM, incoming_gate[incoming] == DREAM])
        age = np.concatenate([self._order[stored], order[incoming]])
        victims = np.lexsort((age, is_dream))[:overflow]  # regular before dream, oldest first
        freed = np.sort(victims[victims < self._size])
        lost = victims[victims >= self._size] - self._size
        return freed, np.delete(incoming, lost)

    def _keep(self, keep: np.ndarray) -> None:
        """Drop every stored entry but those `keep` marks, moving the kept ones to the front slots."""
        kept = np.flatnonzero(keep)
        self._entries[: len(kept)] = [self._entries[i] for i in kept.tolist()]
        self._entries[len(kept) : self._size] = [None] * (self._size - len(kept))
        for column in (self._gate, self._valence, self._arousal, self._order, self._retain):
            column[: len(kept)] = column[kept]
        self._gate[len(kept) : self._size] = EMPTY
        self._size, self._served = len(kept), 0
        self._n_dream = int(np.count_nonzero(self._gate[: self._size] == DREAM))

    def _clear(self) -> None:
        self._entries[: self._size] = [None] * self._size
        self._gate[: self._size] = EMPTY
        self._size = self._n_dream = self._served = 0
        self.tree.clear()

    # ---- priorities -----------------------------------------------------------------------------

    def _set_priority(self, slots: np.ndarray, abs_td: np.ndarray) -> None:
        """Priorities live only in the tree, as sampling weights p^α; uniform and in-order serving ignore them."""
        if self.serving.sampling == "priority":
            self.tree.update(slots, (abs_td + self.cfg.priority_epsilon) ** self.cfg.priority_alpha)
        elif self.serving.sampling == "dream_mix":
            affect = self.cfg.priority_lambda * np.abs(self._valence[slots]) * self._arousal[slots]
            weight = (abs_td + affect + self.cfg.priority_epsilon) ** self.cfg.priority_alpha
            self.tree.update(slots, np.where(self._gate[slots] == DREAM, weight, 0.0))  # the tree holds the Dream Queue

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """Write the TD errors of served entries back as priorities (`|TD| + λ·|v|·a + ε`, or `|TD| + ε`)."""
        indices = np.asarray(indices, dtype=np.int64)
        abs_td = np.abs(np.asarray(td_errors, dtype=np.float64))
        if indices.shape != abs_td.shape:
            raise ValueError(f"update_priorities: {indices.shape} indices but {abs_td.shape} TD errors")
        if indices.size and (indices.min() < 0 or indices.max() >= self._size):
            raise IndexError(f"update_priorities: slots must lie in [0, {self._size}), the occupied part of the buffer")
        if abs_td.size:
            largest = float(abs_td.max())
            if not np.isfinite(largest):
                raise ValueError("update_priorities: TD errors contain NaN or inf; the critic has diverged")
            self._max_td = max(self._max_td, largest)
        self._set_priority(indices, abs_td)  # `difficulty` draws by its batch's variances, not by TD

    # ---- serving --------------------------------------------------------------------------------

    def sample(self, batch_size: int, progress: float) -> Batch:
        """A minibatch; `progress` (0..1 of training) anneals β from `beta_start` to 1."""
        if self._size == 0:
            raise ValueError("sample: the buffer is empty; add trajectories before the nocturnal phase")
        beta = self.cfg.beta_start + min(max(progress, 0.0), 1.0) * (1.0 - self.cfg.beta_start)
        from_dream = np.zeros(batch_size, dtype=bool)
        sampling = self.serving.sampling
        max_weight = 1.0
        if sampling == "in_order":
            indices = self._next_in_order(batch_size)
            weights = np.ones(batch_size)
        elif sampling == "difficulty":  # a curriculum the variant asks for, not a bias to correct: no IS weights
            indices = self.tree.sample(batch_size, self.rng) if self.tree.total > 0 else self.rng.integers(0, self._size, batch_size)
            weights = np.ones(batch_size)
        elif sampling == "success_replay":
            indices = self._sample_success_replay(batch_size)
            weights = np.ones(len(indices))
        elif sampling == "uniform":
            indices = self.rng.integers(0, self._size, batch_size)
            weights = np.ones(batch_size)
        elif sampling == "priority":
            indices = self.tree.sample(batch_size, self.rng)
            weights = (self.tree.min / self.tree[indices]) ** beta  # P_min / P(i): the total cancels
            max_weight = (self._size * self.tree.min / self.tree.total) ** -beta
        else:
            indices, from_dream, weights, max_weight = self._sample_dream_mix(batch_size, beta)
        return Batch(indices, [self._entries[i] for i in indices.tolist()], weights, from_dream, max_weight)

    def _next_in_order(self, batch_size: int) -> np.ndarray:
        """The next entries of the latest batch, in order. Once all have been served a new pass begins
        (the trainer's update budget is the same for every variant); `replay_stats` reports the passes."""
        latest = self._latest()
        positions = self._served + np.arange(batch_size)
        self._served += batch_size
        return latest[positions % len(latest)]

    def _latest(self) -> np.ndarray:
        """The slots of the latest batch, in the order it was added."""
        slots = np.flatnonzero(self._order[: self._size] >= self._batch_start)
        return slots[np.argsort(self._order[slots], kind="stable")]

    @property
    def latest_size(self) -> int:
        """Entries of the latest batch stored (what an on-policy phase serves once)."""
        return int(np.count_nonzero(self._order[: self._size] >= self._batch_start))

    def _sample_success_replay(self, batch_size: int) -> np.ndarray:
        """The latest batch's next `batch_size` entries in order, and success_replay_share × B kept
        successes of earlier batches (the count rounded stochastically, as `_sample_dream_mix` does)."""
        fresh = self._next_in_order(batch_size)
        kept = np.flatnonzero(self._retain[: self._size] & (self._order[: self._size] < self._batch_start))
        n_replay = int(np.floor(self.cfg.success_replay_share * batch_size + self.rng.random())) if len(kept) else 0
        replayed = kept[self.rng.integers(0, len(kept), n_replay)] if n_replay else np.empty(0, dtype=np.int64)
        self._counters["replayed"] += n_replay
        return np.concatenate([fresh, replayed])

    def _sample_dream_mix(self, batch_size: int, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Each draw: the Dream Queue by priority with probability f, else uniform over the whole buffer.

        The number of Dream Queue draws is f·B rounded stochastically (its mean is exactly f·B), so the
        mix holds for any minibatch size: plain rounding would serve 6 of 8 (75 %) for f = 0.8.
        """
        f = self.cfg.dream_fraction if self._n_dream else 0.0
        n_dream = int(np.floor(f * batch_size + self.rng.random()))
        dream_indices = self.tree.sample(n_dream, self.rng) if n_dream else np.empty(0, dtype=np.int64)
        indices = np.concatenate([dream_indices, self.rng.integers(0, self._size, batch_size - n_dream)])
        from_dream = np.arange(batch_size) < n_dream

        size, total = self._size, self.tree.total
        probability = np.full(batch_size, (1 - f) / size) + (f * self.tree[indices] / total if f else 0.0)
        smallest = [f * self.tree.min / total + (1 - f) / size] if f else [1 / size]
        if f < 1 and self._n_dream < size:
            smallest.append((1 - f) / size)  # a regular entry, reachable only by the uniform part
        weights = (min(smallest) / probability) ** beta

        drew_dream = int(np.count_nonzero(self._gate[indices] == DREAM))
        self._counters["dream_draws"] += drew_dream
        self._counters["rest_draws"] += batch_size - drew_dream
        self._counters["dream_exposure"] += self._n_dream
        self._counters["rest_exposure"] += size - self._n_dream
        return indices, from_dream, weights, (size * min(smallest)) ** -beta

    # ---- pruning intensity and logging ----------------------------------------------------------

    def tune_pruning(self, value_estimates: np.ndarray) -> float:
        """Confidence-variance rule: a critic whose value estimates barely vary (std < `confidence_std`)
        has little left to learn from routine samples, so widen the prune band by `prune_step` (up to
        `prune_valence_max`); otherwise narrow it back toward `prune_valence`. Returns the new band."""
        values = np.asarray(value_estimates, dtype=np.float64)
        if values.size < 2:
            raise ValueError(f"tune_pruning needs at least 2 value estimates, got {values.size}")
        if values.std() < self.cfg.confidence_std:
            self.prune_valence = min(self.prune_valence + self.cfg.prune_step, self.cfg.prune_valence_max)
        else:
            self.prune_valence = max(self.prune_valence - self.cfg.prune_step, self.cfg.prune_valence)
        return self.prune_valence

    def replay_stats(self) -> dict:
        """Sizes, totals, and the measured per-entry replay rate of Dream Queue entries relative to the rest.

        `dream_replay_rate` = (draws of Dream Queue entries per Dream Queue entry present) / (the same for
        the rest), summed over every minibatch served so far; NaN until both kinds have been present.
        """
        c = self._counters
        dream_rate = c["dream_draws"] / c["dream_exposure"] if c["dream_exposure"] else float("nan")
        rest_rate = c["rest_draws"] / c["rest_exposure"] if c["rest_exposure"] else float("nan")
        return {
            "size": self._size,
            "dream_size": self._n_dream,
            "regular_size": self._size - self._n_dream,
            "total_added": c["added"],
            "total_pruned": c["pruned"],
            "total_evicted": c["evicted"],
            "in_order_passes": self._served / self.latest_size if self.latest_size else 0.0,
            "kept_successes": int(np.count_nonzero(self._retain[: self._size])),
            "total_replayed_successes": c["replayed"],
            "dream_replay_rate": dream_rate / rest_rate if rest_rate else float("nan"),
            "prune_valence": self.prune_valence,
        }

    # ---- persistence ----------------------------------------------------------------------------

    def state(self) -> dict:
        """The whole state but the config (RNG included): what `save` writes and `from_state` restores."""
        return {name: value for name, value in vars(self).items() if name != "cfg"}

    @classmethod
    def from_state(cls, state: dict, cfg: BufferConfig) -> ReplayBuffer:
        """A buffer in exactly the state `state()` returned. Behaviour follows `cfg`, whose capacity must
        match the saved one."""
        if state["tree"].capacity != cfg.capacity:
            raise ValueError(f"saved with capacity {state['tree'].capacity}, params say {cfg.capacity}")
        buffer = cls.__new__(cls)
        buffer.__dict__.update(state, cfg=cfg)
        return buffer

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write the whole state (see `write_atomically`)."""
        write_atomically(path, {"format": FORMAT_VERSION, "state": self.state()})

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: BufferConfig) -> ReplayBuffer:
        """Reload a buffer written by `save`, in exactly the state it was saved in (RNG included).

        The file is a pickle: load only buffers this pipeline wrote. Behaviour follows `cfg`, whose
        capacity must match the saved one."""
        return read_buffer_file(path, lambda saved: cls.from_state(saved["state"], cfg))


def write_atomically(path: str | os.PathLike, payload: dict) -> None:
    """Pickle `payload` to `path` (`atomic_path`: a crash leaves the previous file or the new one)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL)


def read_buffer_file(path: str | os.PathLike, restore: Callable[[dict], T]) -> T:
    """`restore(payload)` of a file `write_atomically` wrote; any failure (a missing, torn or foreign
    file, or a `restore` that refuses it) becomes a `BufferFileError` that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise BufferFileError(f"{path} not found: run the gate stage first, or restore it with `dvc pull`")
    try:
        with path.open("rb") as handle:
            saved = pickle.load(handle)
        if saved["format"] != FORMAT_VERSION:
            raise ValueError(f"format {saved['format']}, expected {FORMAT_VERSION}")
        return restore(saved)
    except Exception as error:  # unpickling a torn or foreign file can raise almost anything
        raise BufferFileError(
            f"{path} is corrupt or not a CosmoCore buffer ({type(error).__name__}: {error}); "
            "delete it and re-run the gate stage, or restore it with `dvc checkout`"
        ) from None
