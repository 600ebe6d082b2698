"""The numbers the project is judged by (see docs/design.md, "Definitions"): pass@k, hallucination rate,
outcome taxonomy, time to correction, and the statistics that say how far to trust a difference.

Pure functions on plain values, used by training logs and evaluation alike, so both measure the
same thing. numpy and the standard library only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np
import pandas as pd

from cosmocore.data.records import OUTCOMES

HALLUCINATED = "hallucinated"
TTCUnit = Literal["iterations", "updates"]


# ------------------------------------------------------------------------------------------ pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): the probability that at least one of k samples drawn without replacement
    from n, of which c are correct, is correct: 1 − C(n−c, k) / C(n, k), computed as a product so
    that large n does not overflow."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}; draw at least k samples per task")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(per_task: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over tasks, each given as (n samples, c correct)."""
    if not per_task:
        raise ValueError("mean_pass_at_k: no tasks")
    return float(np.mean([pass_at_k(n, c, k) for n, c in per_task]))


# ------------------------------------------------------------------------ hallucination and outcomes


def hallucination_rates(results: Iterable[tuple[bool, bool]]) -> dict[str, float]:
    """Hallucination rate over all samples, split into parts that add up to it.

    `results` holds one (flagged statically, flagged at run time) pair per sample, e.g.
    `[(r.hallucination_static, r.hallucination_runtime) for r in exec_results]`. `static` is the share
    the static check flags; `runtime` the share flagged only at run time (what the static check
    missed), so `rate = static + runtime`.
    """
    flags = np.array([(bool(s), bool(r)) for s, r in results], dtype=bool).reshape(-1, 2)
    if not len(flags):
        raise ValueError("hallucination_rates: no samples")
    static, runtime = flags[:, 0], flags[:, 1]
    return {
        "rate": float(np.mean(static | runtime)),
        "static": float(np.mean(static)),
        "runtime": float(np.mean(runtime & ~static)),
        "n": len(flags),
    }


def outcome_taxonomy(outcomes: Iterable[str]) -> dict[str, float]:
    """Share of samples in each outcome class; every class is present (0.0 when unseen)."""
    counts = Counter(outcomes)
    unknown = set(counts) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"outcome_taxonomy: unknown outcome classes {sorted(unknown)}; expected {OUTCOMES}")
    total = sum(counts.values())
    if not total:
        raise ValueError("outcome_taxonomy: no samples")
    return {outcome: counts[outcome] / total for outcome in OUTCOMES}


# ------------------------------------------------------------------------------- time to correction


def time_to_correction(log: pd.DataFrame, horizon: float, unit: TTCUnit = "iterations") -> dict[str, float]:
    """Training-time self-correction speed (docs/design.md, "Time to correction"), in iterations or in
    optimizer updates.

    `log` has one row per training sample: iteration, task_id, outcome, hallucinated (and
    optimizer_steps for `unit="updates"`, see `updates_before`). A (task, failure kind) pair -- kind =
    an outcome class other than passed, or "hallucinated" -- first seen at iteration i is corrected at
    the first j > i such that iterations j and j+1 are both in the log for that task and neither has
    the kind; TTC = j − i iterations, or the optimizer updates made in between (those of the nocturnal
    phases of iterations i … j−1). A pair never corrected is censored: it is known to need more than
    L − 1 − i iterations (more than the updates of iterations i … L−2), L being the task's last logged
    iteration. Pairs first seen after L − 2 could not have been seen corrected and are left out
    (counted in `n_unobservable`); both units count the same pairs.

    Returns `mean` (over corrected pairs; NaN when none), `censored_share`, `km_mean` (the
    Kaplan–Meier restricted mean: the area under the survival curve from 0 to `horizon`, in `unit`,
    the curve held at its last value beyond the last observed time), `n_pairs`, `n_corrected`,
    `n_unobservable`.
    """
    if horizon < 1:
        raise ValueError(f"time_to_correction: horizon must be >= 1 ({unit}), got {horizon}")
    required = {"iteration", "task_id", "outcome", "hallucinated"} | ({"optimizer_steps"} if unit == "updates" else set())
    missing = required - set(log.columns)
    if missing:
        raise ValueError(f"time_to_correction: the log lacks columns {sorted(missing)}")
    steps = updates_before(log) if unit == "updates" else None
    durations, corrected, unobservable = [], [], 0
    for _, samples in log.groupby("task_id", sort=False):
        pairs, skipped = ttc_pairs(samples, steps)
        durations += [duration for duration, _ in pairs]
        corrected += [event for _, event in pairs]
        unobservable += skipped
    times, events = np.array(durations, dtype=float), np.array(corrected, dtype=bool)
    return {
        "mean": float(times[events].mean()) if events.any() else float("nan"),
        "censored_share": float(1.0 - events.mean()) if len(events) else float("nan"),
        "km_mean": kaplan_meier_restricted_mean(times, events, horizon) if len(events) else float("nan"),
        "n_pairs": len(events),
        "n_corrected": int(events.sum()),
        "n_unobservable": unobservable,
    }


def updates_before(log: pd.DataFrame) -> dict[int, int]:
    """{iteration i: optimizer updates made before iteration i's samples were drawn}.

    The training flow logs with each sample of iteration i the updates done by the end of iteration
    i's nocturnal phase, S(i) (`optimizer_steps`, cumulative). The samples of iteration i come from the
    policy after S(i−1) updates (0 for i = 0), so a pair first seen at i and corrected at j took
    S(j−1) − S(i−1) updates. Needs every iteration from 0 to the last in the log.
    """
    per_iteration = log.groupby("iteration")["optimizer_steps"].agg(["min", "max"])
    uneven = per_iteration.index[per_iteration["min"] != per_iteration["max"]].tolist()
    if uneven:
        raise ValueError(f"time_to_correction: optimizer_steps differs within iteration(s) {uneven}; "
                         "it must be the updates done by the end of that iteration")
    iterations = [int(i) for i in per_iteration.index]
    if iterations != list(range(len(iterations))):
        raise ValueError(f"time_to_correction: counting updates needs every iteration from 0 in the log, got {iterations}")
    done = [int(s) for s in per_iteration["max"]]
    if any(later < earlier for earlier, later in zip(done, done[1:])):
        raise ValueError(f"time_to_correction: optimizer_steps must not decrease over iterations, got {done}")
    return {i: done[i - 1] if i else 0 for i in iterations}


def ttc_pairs(samples: pd.DataFrame, steps_before: dict[int, int] | None = None) -> tuple[list[tuple[float, bool]], int]:
    """One task's observable (task, failure kind) pairs as (TTC, True) when corrected and (censoring
    time, False) when not, in iterations, or in optimizer updates given `updates_before(log)`; and the
    number of unobservable pairs left out (see `time_to_correction`)."""
    pairs, unobservable = [], 0
    for start, end, event in _pair_spans(_failure_kinds(samples)):
        if end - start < 1 and not event:
            unobservable += 1
        elif steps_before is None:
            pairs.append((float(end - start), event))
        else:
            pairs.append((float(steps_before[end] - steps_before[start]), event))
    return pairs, unobservable


def _failure_kinds(samples: pd.DataFrame) -> dict[int, set[str]]:
    """{iteration: failure kinds seen among the task's samples at that iteration}."""
    kinds: dict[int, set[str]] = {}
    for iteration, outcome, hallucinated in samples[["iteration", "outcome", "hallucinated"]].itertuples(index=False):
        seen = kinds.setdefault(int(iteration), set())
        if outcome != "passed":
            seen.add(outcome)
        if hallucinated:
            seen.add(HALLUCINATED)
    return kinds


def _pair_spans(kinds_by_iteration: dict[int, set[str]]) -> list[tuple[int, int, bool]]:
    """(first seen, corrected at, True) for each corrected pair of one task, (first seen, L − 1, False)
    for the others, L being the task's last iteration."""
    last = max(kinds_by_iteration)
    first_seen: dict[str, int] = {}
    for iteration in sorted(kinds_by_iteration):
        for kind in kinds_by_iteration[iteration]:
            first_seen.setdefault(kind, iteration)
    spans = []
    for kind, start in first_seen.items():
        fix = next(
            (
                j
                for j in range(start + 1, last)
                if j in kinds_by_iteration
                and j + 1 in kinds_by_iteration
                and kind not in kinds_by_iteration[j] | kinds_by_iteration[j + 1]
            ),
            None,
        )
        spans.append((start, fix, True) if fix is not None else (start, last - 1, False))
    return spans


def kaplan_meier_restricted_mean(times: np.ndarray, events: np.ndarray, horizon: float) -> float:
    """Area under the Kaplan–Meier survival curve on [0, horizon]: a mean that uses censored pairs
    (as "longer than their censoring time") instead of dropping them. A pair censored at t is at
    risk for events at times <= t."""
    times, events = np.asarray(times, dtype=float), np.asarray(events, dtype=bool)
    area, survival, previous = 0.0, 1.0, 0.0
    for t in np.unique(times[events]):
        if t >= horizon:
            break
        area += survival * (t - previous)
        at_risk = np.sum(times >= t)
        survival *= 1.0 - np.sum((times == t) & events) / at_risk
        previous = t
    return float(area + survival * (horizon - previous))


# -------------------------------------------------------------------------------------- uncertainty


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over per-task values (resampling tasks with
    replacement). For a paired comparison of two variants on the same tasks, pass the per-task
    differences."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_ci: no values")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(values), size=(n_resamples, len(values)))
    estimates = np.array([stat(values[row]) for row in indices])
    low, high = np.quantile(estimates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def minimum_detectable_effect(
    n_per_arm: int,
    base_rate: float,
    alpha: float = 0.05,
    power: float = 0.8,
    direction: Literal["decrease", "increase"] = "decrease",
) -> float:
    """The smallest change of a proportion from `base_rate` that a two-sided two-proportion z-test
    with `n_per_arm` samples per arm detects with probability `power` at level `alpha`.

    Normal approximation with the pooled variance under the null and the unpooled one under the
    alternative: |p1 − p2| = z_(1−α/2)·√(2·p̄(1−p̄)/n) + z_power·√((p1(1−p1) + p2(1−p2))/n), solved
    for p2 by bisection. Returns NaN when no change in `direction` is detectable (e.g. a decrease
    from a 3% rate with 40 tasks per arm): a null result then says nothing.
    """
    if n_per_arm < 1 or not 0.0 <= base_rate <= 1.0:
        raise ValueError(
            f"minimum_detectable_effect: need n_per_arm >= 1 and base_rate in [0, 1], got {n_per_arm}, {base_rate}"
        )
    z_alpha, z_power = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    sign = -1.0 if direction == "decrease" else 1.0
    room = base_rate if direction == "decrease" else 1.0 - base_rate

    def detectable(effect: float) -> bool:
        other = base_rate + sign * effect
        pooled = (base_rate + other) / 2
        null_sd = np.sqrt(2 * pooled * (1 - pooled) / n_per_arm)
        alt_sd = np.sqrt((base_rate * (1 - base_rate) + other * (1 - other)) / n_per_arm)
        return effect >= z_alpha * null_sd + z_power * alt_sd

    if room <= 0 or not detectable(room):
        return float("nan")
    low, high = 0.0, room
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if detectable(middle) else (middle, high)
    return high
