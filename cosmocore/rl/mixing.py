"""Per-kind mixing for the CodeRL+ variants: alignment answers make up `alignment.share` of every
nocturnal minibatch, not only of each iteration's samples.

A CodeRL+ variant keeps one `ReplayBuffer` per trajectory kind ("code", "alignment") behind the
interface of one, `KindMix`. `add` sends each entry to its kind's buffer, where the variant's own gates,
pruning and eviction apply. `sample` draws `alignment_slots` = round(share × B) of a minibatch's B
entries from the alignment buffer and the rest from the code buffer, each part by the variant's own
rule (`coderl_plus`: in order, the latest batch only; `cosmocore_coderl_plus`: the Dream Queue 80/20
mix). With fewer alignment entries stored than that, the minibatch takes as many as there are and the
rest is code; with no code entries, it is all alignment. Nothing is padded: the nocturnal phase logs the
share it actually served (`batch_alignment_share`). `coderl_plus` is on-policy, so it serves every
entry of the latest iteration once: its minibatches hold that iteration's own share of answers, which
is `share` whenever enough questions could be built (`alignment.pick_for_share`), and less, not
answers served twice, when too few could.

Importance-sampling weights: the replay's target is `share` × uniform over the alignment entries plus
(1 − share) × uniform over the code entries (the share is the training mixture the variant asks for,
not a bias to undo), so an entry's unnormalised weight is its own part's `(N_k·P_k(i))^-β`. Both parts'
weights are normalised by the largest such weight of either part, as one buffer normalises by its own
largest: normalising each part by its own would tilt the loss toward one kind, away from the share.

Capacity: `buffer.capacity` is shared, `share` of it for alignment entries and the rest for code (at
least one slot each), so a full buffer also holds the kinds at the configured share. Batch indices
number the slots of the whole: a code slot as it is, an alignment slot after all the code slots.
"""

from __future__ import annotations

import math
import os

import numpy as np
from numpy.typing import ArrayLike

from cosmocore.config import BufferConfig
from cosmocore.rl.buffer import FORMAT_VERSION, Batch, ReplayBuffer, read_buffer_file, write_atomically
from cosmocore.variants import REGISTRY

KINDS = ("code", "alignment")
SUMMED = ("size", "dream_size", "regular_size", "total_added", "total_pruned", "total_evicted")


def alignment_slots(share: float, batch_size: int, n_alignment: int, n_code: int) -> int:
    """How many of a minibatch's `batch_size` entries come from the alignment buffer: share × B rounded
    to the nearest (halves up), capped by the alignment entries stored; all of them when no code is stored.

    >>> alignment_slots(0.4, 10, 50, 50), alignment_slots(0.4, 8, 50, 50), alignment_slots(0.5, 5, 50, 50)
    (4, 3, 3)
    >>> alignment_slots(0.4, 10, 2, 50), alignment_slots(0.4, 10, 5, 0), alignment_slots(0.4, 10, 0, 5)
    (2, 10, 0)
    """
    if n_code == 0:
        return batch_size if n_alignment else 0
    return min(math.floor(share * batch_size + 0.5), n_alignment)


def part_configs(cfg: BufferConfig, share: float) -> dict[str, BufferConfig]:
    """Each kind's buffer config: `share` of the capacity for alignment entries, the rest for code."""
    alignment = max(1, round(share * cfg.capacity))
    capacity = {"code": max(1, cfg.capacity - alignment), "alignment": alignment}
    return {kind: cfg.model_copy(update={"capacity": capacity[kind]}) for kind in KINDS}


class KindMix:
    """One `ReplayBuffer` per trajectory kind, served at a fixed alignment share (module docstring).
    Build one with `make_buffer`, reload one with `KindMix.load` (or `load_buffer`)."""

    def __init__(self, parts: dict[str, ReplayBuffer], share: float) -> None:
        if set(parts) != set(KINDS):
            raise ValueError(f"KindMix needs one buffer per kind ({', '.join(KINDS)}), got {', '.join(parts)}")
        self.parts = {kind: parts[kind] for kind in KINDS}
        self.share = share
        self.variant = parts["code"].variant
        starts = np.cumsum([0] + [part.cfg.capacity for part in self.parts.values()])
        self._start = dict(zip(KINDS, starts[:-1].tolist()))

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())

    @property
    def prune_valence(self) -> float:
        return self.parts["code"].prune_valence  # both parts are tuned alike

    @property
    def cfg(self) -> BufferConfig:
        return self.parts["code"].cfg  # the parts differ only in capacity

    @property
    def latest_size(self) -> int:
        return sum(part.latest_size for part in self.parts.values())

    @property
    def priority_nbytes(self) -> int:
        return sum(part.priority_nbytes for part in self.parts.values())

    def entries(self) -> list:
        """The stored entries, code first, then alignment."""
        return [entry for part in self.parts.values() for entry in part.entries()]

    # ---- filling --------------------------------------------------------------------------------

    def add(self, entries: list[dict], valence: ArrayLike, arousal: ArrayLike, entropy: ArrayLike,
            td: ArrayLike | None = None, variance: ArrayLike | None = None, retain: ArrayLike | None = None) -> dict:
        """Gate and store each entry (a dict with a "kind") in its kind's buffer. Returns what
        `ReplayBuffer.add` does, for the whole add, plus each kind's counts as `<kind>_<count>`.
        Every part is added to, with no rows if need be, so an in-order part drops its stale batch."""
        n = len(entries)
        columns = {name: np.asarray(x, dtype=np.float64).reshape(-1) for name, x in
                   (("valence", valence), ("arousal", arousal), ("entropy", entropy), ("td", td), ("variance", variance),
                    ("retain", retain)) if x is not None}
        if any(len(column) != n for column in columns.values()):
            raise ValueError(f"add: {n} entries but {', '.join(columns)} have lengths {[len(c) for c in columns.values()]}")
        kinds = [entry.get("kind") for entry in entries]
        unknown = sorted({str(kind) for kind in kinds} - set(KINDS))
        if unknown:
            raise ValueError(f"add: entries of kind {', '.join(unknown)}; a KindMix stores only {', '.join(KINDS)}")
        totals: dict[str, int] = {}
        by_kind: dict[str, int] = {}
        for kind, part in self.parts.items():
            rows = np.array([i for i, k in enumerate(kinds) if k == kind], dtype=np.int64)
            picked = {name: column[rows] for name, column in columns.items()}
            if "retain" in picked:
                picked["retain"] = picked["retain"].astype(bool)
            added = part.add([entries[i] for i in rows], **picked)
            for key, value in added.items():
                if isinstance(value, int):  # counts; shares are recomputed below
                    totals[key] = totals.get(key, 0) + value
                    by_kind[f"{kind}_{key}"] = value
        shares = {f"{key}_share": totals[key] / max(n, 1) for key in ("dream", "regular", "pruned")}
        return {**totals, **shares, "prune_valence": self.prune_valence, **by_kind}

    # ---- serving --------------------------------------------------------------------------------

    def sample(self, batch_size: int, progress: float) -> Batch:
        """A minibatch of `alignment_slots` alignment entries and code entries for the rest, each part
        drawn by the variant's rule, with IS weights on one scale (module docstring)."""
        sizes = {kind: len(part) for kind, part in self.parts.items()}
        if not any(sizes.values()):
            raise ValueError("sample: the buffer is empty; add trajectories before the nocturnal phase")
        share = self.share
        if self.parts["code"].serving.sampling == "in_order":  # on-policy: the iteration's own mix, each entry once
            share = sizes["alignment"] / (sizes["alignment"] + sizes["code"])
        n_alignment = alignment_slots(share, batch_size, sizes["alignment"], sizes["code"])
        slots = {"code": batch_size - n_alignment, "alignment": n_alignment}
        drawn = {kind: self.parts[kind].sample(n, progress) for kind, n in slots.items() if n}
        top = max(batch.max_weight for batch in drawn.values())
        return Batch(
            indices=np.concatenate([batch.indices + self._start[kind] for kind, batch in drawn.items()]),
            entries=[entry for batch in drawn.values() for entry in batch.entries],
            is_weights=np.concatenate([batch.is_weights * (batch.max_weight / top) for batch in drawn.values()]),
            from_dream=np.concatenate([batch.from_dream for batch in drawn.values()]),
            max_weight=top,
        )

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """Route served entries' TD errors back to their parts (indices as `sample` numbered them)."""
        indices = np.asarray(indices, dtype=np.int64)
        td_errors = np.asarray(td_errors, dtype=np.float64)
        if indices.shape != td_errors.shape:
            raise ValueError(f"update_priorities: {indices.shape} indices but {td_errors.shape} TD errors")
        for kind, part in self.parts.items():
            start = self._start[kind]
            mine = (indices >= start) & (indices < start + part.cfg.capacity)
            part.update_priorities(indices[mine] - start, td_errors[mine])

    # ---- pruning intensity and logging ----------------------------------------------------------

    def tune_pruning(self, value_estimates: np.ndarray) -> float:
        """The confidence-variance rule on both parts alike; returns the new band."""
        for part in self.parts.values():
            part.tune_pruning(value_estimates)
        return self.prune_valence

    def replay_stats(self) -> dict:
        """Sizes and totals of the whole, the share of alignment entries held, and each part's own
        stats as `<kind>_<stat>`. `dream_replay_rate` is the code part's: the CosmoCore measure, on the
        kind it was defined for (the alignment part's is `alignment_dream_replay_rate`)."""
        parts = {kind: part.replay_stats() for kind, part in self.parts.items()}
        stats = {key: sum(part[key] for part in parts.values()) for key in SUMMED}
        stats["alignment_share"] = parts["alignment"]["size"] / stats["size"] if stats["size"] else 0.0
        stats["dream_replay_rate"] = parts["code"]["dream_replay_rate"]
        stats["prune_valence"] = self.prune_valence
        for kind, part in parts.items():
            stats.update({f"{kind}_{key}": value for key, value in part.items()})
        return stats

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Both parts in one file, written atomically (`buffer.write_atomically`): a crash never leaves
        one part newer than the other."""
        parts = {kind: part.state() for kind, part in self.parts.items()}
        write_atomically(path, {"format": FORMAT_VERSION, "share": self.share, "parts": parts})

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: BufferConfig, share: float) -> KindMix:
        """Reload a `KindMix` written by `save`, in exactly its saved state. `cfg` and `share` must give
        the capacities it was saved with."""
        def restore(saved: dict) -> KindMix:
            if "parts" not in saved:
                raise ValueError("it holds one buffer for all kinds: it was saved for a variant without CodeRL+")
            if saved["share"] != share:
                raise ValueError(f"saved with alignment.share {saved['share']}, params say {share}")
            configs = part_configs(cfg, share)
            return cls({kind: ReplayBuffer.from_state(saved["parts"][kind], configs[kind]) for kind in KINDS}, share)

        return read_buffer_file(path, restore)


def make_buffer(cfg: BufferConfig, variant: str, seed: int, share: float) -> ReplayBuffer | KindMix:
    """The variant's buffer: a `KindMix` at `share` (`alignment.share`) for the CodeRL+ variants, one
    `ReplayBuffer` for the others."""
    if not REGISTRY[variant].alignment:
        return ReplayBuffer(cfg, variant, seed)
    configs = part_configs(cfg, share)
    seeds = [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(len(KINDS))]
    return KindMix({kind: ReplayBuffer(configs[kind], variant, s) for kind, s in zip(KINDS, seeds)}, share)


def load_buffer(path: str | os.PathLike, cfg: BufferConfig, variant: str, share: float) -> ReplayBuffer | KindMix:
    """Reload what `make_buffer(cfg, variant, seed, share)` made and saved."""
    if not REGISTRY[variant].alignment:
        return ReplayBuffer.load(path, cfg)
    return KindMix.load(path, cfg, share)
