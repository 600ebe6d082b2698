"""The ablation report (docs/design.md, "Honest evaluation"; issue 7): held-out metrics per policy with
bootstrap intervals, CosmoCore's paired comparisons against each baseline with the smallest effect the
run could have detected, one plain sentence per claim, and the plots.

Every number the markdown states is also in the returned numbers dict, so a test can check the report
against the files it was made from. pandas, numpy and matplotlib only: the report flow reads the files
and writes what this module returns.

Intervals are percentile bootstraps. Tasks are resampled jointly across policies, so a difference of
two policies is paired on tasks (they were evaluated on the same held-out tasks, or trained on the same
training tasks); where a variant has several seeds, its seeds are resampled on their own as well, since
seeds are independent training runs. With one seed per variant this is exactly `metrics.bootstrap_ci`
over per-task values (or per-task differences).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cosmocore.evaluation.metrics import (  # noqa: E402
    TTCUnit,
    kaplan_meier_restricted_mean,
    minimum_detectable_effect,
    ttc_pairs,
    updates_before,
)
from cosmocore.variants import REGISTRY  # noqa: E402

TREATMENT = "cosmocore"
CONTROLS = tuple(name for name, variant in REGISTRY.items() if variant.control) + ("base",)
N_RESAMPLES = 2000
ALPHA = 0.05
POWER = 0.8
# A difference estimated with standard error SE is detected with probability POWER at level ALPHA
# (two-sided) when it is at least this many SEs: the MDE of measures that are not proportions (TTC).
Z_MDE = NormalDist().inv_cdf(1 - ALPHA / 2) + NormalDist().inv_cdf(POWER)
GATE_COLUMNS = {"dream": "gate_dream_share", "regular": "gate_regular_share", "pruned": "gate_pruned_share"}
CURVE_COLUMNS = ("train_hallucination_rate", "train_pass_rate", "train_reward")
PairsByTask = dict[str, tuple[np.ndarray, np.ndarray]]


EXEC_KEYS = ("exec_output_accuracy", "exec_alignment_reward", "exec_tasks")  # written by the evaluate stage


@dataclass(frozen=True)
class Metric:
    """How one compared measure is named in sentences and which direction counts as better."""

    key: str
    label: str
    better: Literal["lower", "higher"]
    why_missing: str = ""  # said when a policy has no value of this measure

    @property
    def improvement(self) -> str:
        return "drop" if self.better == "lower" else "rise"


PASS = Metric("pass_at_1", "held-out pass@1", "higher")
HALLUCINATION = Metric("hallucination_rate", "held-out hallucination rate", "lower")
TTC_UNMEASURED = (" (a failure is seen corrected only once two later iterations are free of it, so a run this short "
                  "has no measurable failure)")
TTC = Metric("ttc_km_mean", "time to correction (Kaplan-Meier mean, iterations)", "lower", TTC_UNMEASURED)
TTC_UPDATES = Metric("ttc_updates_km_mean", "time to correction (Kaplan-Meier mean, optimizer updates)", "lower",
                     TTC_UNMEASURED)
TTC_METRICS = {"iterations": TTC, "updates": TTC_UPDATES}
HELDOUT_METRICS = (PASS, HALLUCINATION)


@dataclass(frozen=True)
class ReportInputs:
    """What the report is made from, keyed by policy: `base` or `<variant>-s<seed>`.

    `heldout_samples` are the evaluate stage's trajectory tables (one row per held-out sample);
    `eval_metrics` its metrics files, checked against what is recomputed here; `histories`,
    `samples_logs` and `rollouts` (all iterations' trajectory tables concatenated) come from training.
    `decoding` names the held-out table used, `greedy` (metric keys prefixed `greedy_`) or `sampled`.
    `horizon` is the TTC horizon in iterations (the run's length) and `horizon_updates` in optimizer
    updates (the run's update budget; None: TTC is not reported in updates).
    """

    profile: str
    eval_metrics: dict[str, dict]
    heldout_samples: dict[str, pd.DataFrame]
    histories: dict[str, pd.DataFrame]
    samples_logs: dict[str, pd.DataFrame]
    rollouts: dict[str, pd.DataFrame]
    horizon: int
    decoding: Literal["greedy", "sampled"] = "greedy"
    horizon_updates: int | None = None

    @property
    def metric_prefix(self) -> str:
        return "greedy_" if self.decoding == "greedy" else ""

    def ttc_horizon(self, unit: TTCUnit) -> int | None:
        return self.horizon if unit == "iterations" else self.horizon_updates


# ------------------------------------------------------------------------------------ policies


def split_policy(policy: str) -> tuple[str, int | None]:
    """`cosmocore-s0` → (`cosmocore`, 0); `base` → (`base`, None)."""
    if policy == "base":
        return "base", None
    variant, _, seed = policy.rpartition("-s")
    if not variant or not seed.isdigit():
        raise ValueError(f"policy {policy!r} is neither `base` nor `<variant>-s<seed>`")
    return variant, int(seed)


def group_by_variant(policies: Sequence[str]) -> dict[str, list[str]]:
    """{variant: its policies in seed order}, variants in the order first seen."""
    groups: dict[str, list[str]] = {}
    for policy in policies:
        groups.setdefault(split_policy(policy)[0], []).append(policy)
    return {variant: sorted(members, key=lambda p: split_policy(p)[1] or 0) for variant, members in groups.items()}


# ------------------------------------------------------------------------------------ per task


def per_task_heldout(samples: pd.DataFrame) -> pd.DataFrame:
    """Per held-out task, the share of its samples that passed, that are hallucinated, that hold no
    code and that do not parse (a policy that writes nothing also hallucinates nothing).

    Their means over tasks are the unbiased pass@1 and, with equal samples per task as the evaluate
    stage draws, the sample rates: so tasks, not samples, are the unit the bootstrap resamples.
    """
    flags = pd.DataFrame({
        "task_id": samples["task_id"],
        PASS.key: (samples["outcome"] == "passed").astype(float),
        HALLUCINATION.key: samples["hallucinated"].astype(float),
        "no_code_rate": (samples["outcome"] == "no_code").astype(float),
        "syntax_error_rate": (samples["outcome"] == "syntax_error").astype(float),
    })
    return flags.groupby("task_id").mean().sort_index()


def benchmark_counts(task_ids: Sequence[str]) -> dict[str, int]:
    """Tasks per benchmark, named as their ids begin (`HumanEval/0`, `BigCodeBench/12`): with
    `data.train_benchmarks` / `data.eval_benchmarks` training and held-out tasks may come from
    different benchmarks, and the report says so."""
    return dict(Counter(str(task_id).split("/")[0] for task_id in task_ids))


def ttc_pairs_by_task(log: pd.DataFrame, unit: TTCUnit = "iterations") -> PairsByTask:
    """(durations, corrected flags) of each training task's (task, failure kind) pairs, counted exactly
    as `metrics.time_to_correction` counts them (unobservable pairs left out), in iterations or in
    optimizer updates, kept per task so that tasks can be resampled. Tasks without a pair stay, with
    empty arrays: they weigh in the resampling."""
    steps = updates_before(log) if unit == "updates" else None
    pairs: PairsByTask = {}
    for task_id, samples in log.groupby("task_id", sort=True):
        kept, _ = ttc_pairs(samples, steps)
        pairs[str(task_id)] = (np.array([d for d, _ in kept], dtype=float), np.array([e for _, e in kept], dtype=bool))
    return pairs


def ttc_pairs_by_unit(inputs: ReportInputs) -> dict[str, dict[str, PairsByTask]]:
    """{unit: {trained policy: its `ttc_pairs_by_task`}}; in updates only for the samples logs that
    record optimizer steps, and only when the inputs give an update horizon."""
    pairs = {"iterations": {policy: ttc_pairs_by_task(log) for policy, log in inputs.samples_logs.items()}}
    if inputs.horizon_updates is not None:
        pairs["updates"] = {policy: ttc_pairs_by_task(log, "updates") for policy, log in inputs.samples_logs.items()
                            if "optimizer_steps" in log}
    return pairs


def ttc_km_mean(pairs: PairsByTask, tasks: Sequence[str], horizon: float) -> float:
    """The Kaplan-Meier mean TTC of the pooled pairs of `tasks` (repeats allowed); NaN without pairs."""
    times = np.concatenate([pairs[t][0] for t in tasks]) if tasks else np.array([])
    events = np.concatenate([pairs[t][1] for t in tasks]) if tasks else np.array([], dtype=bool)
    return kaplan_meier_restricted_mean(times, events, horizon) if len(times) else float("nan")


# ------------------------------------------------------------------------------------ bootstrap


def resample_indices(n_items: int, seed: int = 0, n_resamples: int = N_RESAMPLES) -> np.ndarray:
    """(resamples × items) indices drawn with replacement, as `metrics.bootstrap_ci` draws them, shared
    by every policy so that differences are paired."""
    return np.random.default_rng(seed).integers(0, n_items, size=(n_resamples, n_items))


def combine_seeds(per_seed: np.ndarray, seed: int) -> np.ndarray:
    """Mean over seeds of resampled statistics (seeds × resamples), the seeds themselves resampled
    with replacement in each resample; a single seed is returned as it is."""
    n_seeds, n_resamples = per_seed.shape
    if n_seeds == 1:
        return per_seed[0]
    chosen = np.random.default_rng(seed).integers(0, n_seeds, size=(n_resamples, n_seeds))
    return np.take_along_axis(per_seed.T, chosen, axis=1).mean(axis=1)


def interval(resampled: np.ndarray) -> tuple[float, float]:
    """The percentile interval at level 1 − ALPHA (resamples without a value, e.g. no TTC pair, left out)."""
    finite = resampled[np.isfinite(resampled)]
    if not finite.size:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [ALPHA / 2, 1 - ALPHA / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap resamples (kept for paired differences) and interval."""

    value: float
    resampled: np.ndarray

    @property
    def ci(self) -> tuple[float, float]:
        return interval(self.resampled)

    def as_dict(self) -> dict[str, float]:
        low, high = self.ci
        return {"value": self.value, "ci_low": low, "ci_high": high}


# ------------------------------------------------------------------------------------ estimates


def heldout_estimates(inputs: ReportInputs) -> tuple[dict[str, dict[str, Estimate]], list[str]]:
    """{policy: {metric: Estimate}} over the held-out tasks, and those tasks. Fails when a policy was
    evaluated on other tasks than the rest, or when the metrics file disagrees with its samples."""
    tables = {policy: per_task_heldout(frame) for policy, frame in inputs.heldout_samples.items()}
    tasks = sorted(next(iter(tables.values())).index)
    for policy, table in tables.items():
        if sorted(table.index) != tasks:
            raise ValueError(f"{policy} was evaluated on other held-out tasks than the other policies: re-run evaluate")
    draws = resample_indices(len(tasks))
    estimates = {}
    for policy, table in tables.items():
        estimates[policy] = {}
        for metric in HELDOUT_METRICS:
            values = table.loc[tasks, metric.key].to_numpy()
            estimates[policy][metric.key] = Estimate(float(values.mean()), values[draws].mean(axis=1))
            _check_against_file(inputs, policy, inputs.metric_prefix + metric.key, float(values.mean()))
    return estimates, tasks


def ttc_estimates(inputs: ReportInputs, pairs: dict[str, PairsByTask],
                  unit: TTCUnit = "iterations") -> tuple[dict[str, Estimate], list[str]]:
    """{trained policy: Estimate of the Kaplan-Meier mean TTC in `unit`} over the training tasks, and
    those tasks. `pairs` is `ttc_pairs_by_task` of each policy's samples log, in that unit. The same
    resampled tasks serve both units, so their intervals are paired alike."""
    if not pairs:
        return {}, []
    tasks = sorted(set().union(*(p.keys() for p in pairs.values())))
    draws = resample_indices(len(tasks), seed=1)
    empty = (np.array([]), np.array([], dtype=bool))
    horizon = inputs.ttc_horizon(unit)
    estimates = {}
    for policy, by_task in pairs.items():
        by_task = {t: by_task.get(t, empty) for t in tasks}
        value = ttc_km_mean(by_task, tasks, horizon)
        _check_against_file(inputs, policy, TTC_METRICS[unit].key, value)
        resampled = np.array([ttc_km_mean(by_task, [tasks[i] for i in row], horizon) for row in draws])
        estimates[policy] = Estimate(value, resampled)
    return estimates, tasks


def _check_against_file(inputs: ReportInputs, policy: str, key: str, value: float) -> None:
    """The report must state what the metrics files state: a mismatch means stale or foreign inputs."""
    stated = inputs.eval_metrics.get(policy, {}).get(key)
    if stated is not None and not np.isclose(stated, value, equal_nan=True):
        raise ValueError(f"{policy}: {key} recomputed as {value:.6f} but the metrics file says {stated:.6f}; "
                         "the report's inputs are out of date with each other: re-run evaluate")


def variant_estimates(per_policy: dict[str, Estimate], groups: dict[str, list[str]]) -> dict[str, Estimate]:
    """{variant: mean over its seeds}, its resamples also resampling seeds (see `combine_seeds`)."""
    estimates = {}
    for number, (variant, policies) in enumerate(groups.items()):
        members = [per_policy[p] for p in policies if p in per_policy]
        if members:
            value = float(np.mean([m.value for m in members]))
            estimates[variant] = Estimate(value, combine_seeds(np.stack([m.resampled for m in members]), seed=100 + number))
    return estimates


# ------------------------------------------------------------------------------------ comparisons


@dataclass(frozen=True)
class Comparison:
    """CosmoCore minus one control on one metric, paired on tasks."""

    metric: Metric
    control: str
    treatment_value: float
    control_value: float
    difference: Estimate
    mde: float
    n_tasks: int

    @property
    def excludes_zero(self) -> bool:
        low, high = self.difference.ci
        return low > 0 or high < 0

    def sentence(self) -> str:
        """The claim in plain words, whatever it says: a null or an adverse result is stated as it is."""
        low, high = self.difference.ci
        diff, t, c = self.difference.value, self.treatment_value, self.control_value
        if np.isnan(diff):
            missing = " and ".join(name for name, value in ((TREATMENT, t), (self.control, c)) if np.isnan(value))
            return f"CosmoCore and {self.control} cannot be compared on {self.metric.label}: this run measured none for {missing}{self.metric.why_missing}."
        numbers = f"({fmt(diff)}, 95% CI [{fmt(low)}, {fmt(high)}])"
        if diff == 0:
            head = f"CosmoCore and {self.control} have the same {self.metric.label}, {fmt(t)} {numbers}"
        else:
            verb = "lowers" if diff < 0 else "raises"
            head = f"CosmoCore {verb} {self.metric.label} against {self.control} from {fmt(c)} to {fmt(t)} {numbers}"
        if self.excludes_zero:
            better = (diff < 0) == (self.metric.better == "lower")
            verdict = f"the interval excludes 0, so at this budget CosmoCore is {'better' if better else 'worse'} on this measure"
        else:
            verdict = "the interval includes 0, so this run cannot tell them apart"
        return f"{head}: {verdict}; {self._mde_clause()}."

    def _mde_clause(self) -> str:
        if np.isnan(self.mde):
            return f"no {self.metric.improvement} from {fmt(self.control_value)} could be detected with {self.n_tasks} tasks"
        return f"the smallest {self.metric.improvement} it could detect is {fmt(self.mde)}"

    def as_dict(self) -> dict:
        return {
            "metric": self.metric.key, "treatment": TREATMENT, "control": self.control,
            "treatment_value": self.treatment_value, "control_value": self.control_value,
            "difference": self.difference.as_dict(), "excludes_zero": self.excludes_zero,
            "mde": self.mde, "n_tasks": self.n_tasks, "sentence": self.sentence(),
        }


def compare(metric: Metric, control: str, estimates: dict[str, Estimate], n_tasks: int) -> Comparison:
    """CosmoCore against `control` on `metric`. The MDE of a proportion is the two-proportion z-test's
    (`metrics.minimum_detectable_effect`, n = held-out tasks per arm, from the control's rate); that of
    TTC is Z_MDE bootstrap standard errors of the difference."""
    treated, base = estimates[TREATMENT], estimates[control]
    difference = Estimate(treated.value - base.value, treated.resampled - base.resampled)
    if metric in TTC_METRICS.values():
        finite = difference.resampled[np.isfinite(difference.resampled)]
        mde = Z_MDE * float(np.std(finite)) if finite.size else float("nan")
    else:
        direction = "decrease" if metric.better == "lower" else "increase"
        mde = minimum_detectable_effect(n_tasks, base.value, ALPHA, POWER, direction)
    return Comparison(metric, control, treated.value, base.value, difference, mde, n_tasks)


def comparisons(heldout: dict[str, dict[str, Estimate]], ttc: dict[str, dict[str, Estimate]], n_heldout: int,
                n_train: int) -> list[Comparison]:
    """Every comparison of CosmoCore with a control present: held-out metrics against all controls,
    TTC (`ttc`: {unit: {variant: Estimate}}, in iterations and in optimizer updates) against the
    trained ones (the base model is not trained, so it has no TTC)."""
    if TREATMENT not in heldout:
        return []
    found = []
    for control in (c for c in CONTROLS if c in heldout):
        for metric in (HALLUCINATION, PASS):
            found.append(compare(metric, control, {v: e[metric.key] for v, e in heldout.items()}, n_heldout))
        for unit, estimates in ttc.items():
            if control in estimates and TREATMENT in estimates:
                found.append(compare(TTC_METRICS[unit], control, estimates, n_train))
    return found


# ------------------------------------------------------------------------------------ training


def buffer_summary(histories: dict[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
    """Per trained policy: the gate shares averaged over iterations, the measured replay rate of Dream
    Queue entries relative to the rest at the end (the paper reports about 5), and the updates made."""
    summary = {}
    for policy, history in histories.items():
        row = {f"{gate}_share": float(history[column].mean()) for gate, column in GATE_COLUMNS.items() if column in history}
        if "buffer_dream_replay_rate" in history:
            row["dream_replay_rate"] = float(history["buffer_dream_replay_rate"].iloc[-1])
        if "optimizer_steps" in history:
            row["optimizer_steps"] = int(history["optimizer_steps"].iloc[-1])
        summary[policy] = row
    return summary


# ------------------------------------------------------------------------------------ plots


def plot_learning_curves(histories: dict[str, pd.DataFrame], ttc_pairs: dict[str, dict[str, PairsByTask]],
                         horizons: dict[str, int | None], path: Path) -> Path:
    """Train hallucination rate, pass rate and reward per iteration, and the share of failure pairs
    corrected within t iterations, and within t optimizer updates when measured (the TTC distribution;
    never-corrected pairs count as not corrected). `ttc_pairs` and `horizons` are keyed by unit."""
    fig, axes = plt.subplots(1, len(CURVE_COLUMNS) + len(ttc_pairs), figsize=(4.25 * (len(CURVE_COLUMNS) + len(ttc_pairs)), 3.6))
    for policy, history in histories.items():
        for ax, column in zip(axes, CURVE_COLUMNS):
            ax.plot(history["iteration"], history[column], marker="o", label=policy)
            ax.set_title(column.replace("_", " "))
            ax.set_xlabel("iteration")
    for ax, (unit, pairs) in zip(axes[len(CURVE_COLUMNS):], ttc_pairs.items()):
        for policy, by_task in pairs.items():
            times = np.concatenate([p[0] for p in by_task.values()]) if by_task else np.array([])
            events = np.concatenate([p[1] for p in by_task.values()]) if by_task else np.array([], dtype=bool)
            if len(times):
                steps = np.arange(1, horizons[unit] + 1)
                ax.step(steps, [np.mean(events & (times <= t)) for t in steps], where="post", label=policy)
        ax.set_title("failure pairs corrected within t")
        ax.set_xlabel(f"t ({'optimizer updates' if unit == 'updates' else unit})")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_heldout(rows: dict[str, dict[str, Estimate]], path: Path) -> Path:
    """Held-out pass@1 and hallucination rate per policy, with the 95% intervals as error bars."""
    fig, axes = plt.subplots(1, len(HELDOUT_METRICS), figsize=(6 * len(HELDOUT_METRICS), 3.8))
    names = list(rows)
    for ax, metric in zip(axes, HELDOUT_METRICS):
        values = np.array([rows[n][metric.key].value for n in names])
        cis = np.array([rows[n][metric.key].ci for n in names])
        errors = np.clip(np.vstack([values - cis[:, 0], cis[:, 1] - values]), 0, None)
        bars = ax.bar(names, values, yerr=errors, capsize=4, color="tab:blue", alpha=0.7)
        ax.bar_label(bars, fmt="%.3f", padding=2, fontsize=8)
        ax.set_title(f"{metric.label} (95% CI)")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def plot_affect(rollouts: dict[str, pd.DataFrame], path: Path) -> Path | None:
    """Predicted valence against arousal of the CosmoCore runs' code rollouts, coloured by outcome;
    None when no CosmoCore run left rollouts."""
    frames = [f for policy, f in rollouts.items() if split_policy(policy)[0].startswith(TREATMENT)]
    if not frames:
        return None
    code = pd.concat(frames)
    code = code[code["kind"] == "code"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for outcome, group in code.groupby("outcome"):
        ax.scatter(group["valence"], group["arousal"], s=14, alpha=0.7, label=f"{outcome} ({len(group)})")
    ax.set_xlabel("valence")
    ax.set_ylabel("arousal")
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("affect of CosmoCore rollouts")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_buffer(histories: dict[str, pd.DataFrame], path: Path) -> Path:
    """The gates' shares of each iteration's rollouts (Dream Queue, regular pool, Prune Bin), one panel per run."""
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.6), squeeze=False)
    for ax, (policy, history) in zip(axes[0], histories.items()):
        present = {gate: history[c] for gate, c in GATE_COLUMNS.items() if c in history}
        ax.stackplot(history["iteration"], *present.values(), labels=list(present), alpha=0.8)
        ax.set_title(policy)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("share of rollouts")
    axes[0][0].legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ the report


def fmt(value: float | None) -> str:
    """The one way the report prints a number, so the test can find each stated number."""
    return "—" if value is None or np.isnan(value) else f"{value:.3f}"


def build_report(inputs: ReportInputs, out_dir: Path) -> tuple[str, dict]:
    """The markdown report and every number it states; the plots are written to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_by_variant(list(inputs.heldout_samples))
    heldout, tasks = heldout_estimates(inputs)
    pairs = ttc_pairs_by_unit(inputs)
    estimated = {unit: ttc_estimates(inputs, by_policy, unit) for unit, by_policy in pairs.items()}
    ttc = {unit: estimates for unit, (estimates, _) in estimated.items()}  # {unit: {policy: Estimate}}
    train_tasks = estimated["iterations"][1]
    by_variant = {metric.key: variant_estimates({p: e[metric.key] for p, e in heldout.items()}, groups) for metric in HELDOUT_METRICS}
    variant_heldout = {v: {m: by_variant[m][v] for m in by_variant} for v in groups}
    variant_ttc = {unit: variant_estimates(estimates, groups) for unit, estimates in ttc.items()}
    found = comparisons(variant_heldout, variant_ttc, len(tasks), len(train_tasks))
    multi_seed = {v: ps for v, ps in groups.items() if len(ps) > 1}

    plots = [plot_heldout(heldout | {f"{v} (mean)": variant_heldout[v] for v in multi_seed}, out_dir / "heldout.png"),
             plot_learning_curves(inputs.histories, pairs, {unit: inputs.ttc_horizon(unit) for unit in pairs},
                                  out_dir / "learning_curves.png"),
             plot_buffer(inputs.histories, out_dir / "buffer_composition.png") if inputs.histories else None,
             plot_affect(inputs.rollouts, out_dir / "affect_scatter.png")]
    plot_names = [p.name for p in plots if p is not None]

    numbers = {
        "profile": inputs.profile, "decoding": inputs.decoding, "heldout_tasks": len(tasks),
        "train_tasks": len(train_tasks), "horizon": inputs.horizon, "horizon_updates": inputs.horizon_updates,
        "heldout_benchmarks": benchmark_counts(tasks), "train_benchmarks": benchmark_counts(train_tasks),
        "policies": {p: _policy_numbers(inputs, p, heldout[p], _ttc_of(ttc, p)) for p in heldout},
        "variants": {v: _variant_numbers(ps, variant_heldout[v], _ttc_of(variant_ttc, v)) for v, ps in groups.items()},
        "comparisons": [c.as_dict() for c in found],
        "buffer": buffer_summary(inputs.histories),
        "execution_reasoning": {p: {k: float(m[k]) for k in EXEC_KEYS} for p, m in inputs.eval_metrics.items()
                                if all(k in m for k in EXEC_KEYS)},
        "plots": plot_names,
        "method": {"resamples": N_RESAMPLES, "alpha": ALPHA, "power": POWER, "z_mde": Z_MDE},
    }
    return render(numbers, multi_seed), numbers


def _ttc_of(ttc: dict[str, dict[str, Estimate]], name: str) -> dict[str, Estimate]:
    """{TTC metric key: Estimate} of one policy or variant, for the units it was measured in."""
    return {TTC_METRICS[unit].key: estimates[name] for unit, estimates in ttc.items() if name in estimates}


def _policy_numbers(inputs: ReportInputs, policy: str, heldout: dict[str, Estimate], ttc: dict[str, Estimate]) -> dict:
    variant, seed = split_policy(policy)
    row: dict = {"variant": variant, "seed": seed, **{m: e.as_dict() for m, e in heldout.items()}}
    row |= {key: estimate.as_dict() for key, estimate in ttc.items()}
    if ttc:
        row["ttc_censored_share"] = float(inputs.eval_metrics.get(policy, {}).get("ttc_censored_share", float("nan")))
    return row


def _variant_numbers(policies: list[str], heldout: dict[str, Estimate], ttc: dict[str, Estimate]) -> dict:
    row: dict = {"seeds": [split_policy(p)[1] for p in policies], **{m: e.as_dict() for m, e in heldout.items()}}
    return row | {key: estimate.as_dict() for key, estimate in ttc.items()}


def render(numbers: dict, multi_seed: dict[str, list[str]]) -> str:
    """The markdown; it states numbers from `numbers` only."""
    seeds = sorted({s for v in numbers["variants"].values() for s in v["seeds"] if s is not None})
    variants = [v for v in numbers["variants"] if v != "base"]
    method = numbers["method"]
    in_updates = numbers["horizon_updates"] is not None
    budget = f" (at most {numbers['horizon_updates']} optimizer updates)" if in_updates else ""
    heldout_from, train_from = numbers["heldout_benchmarks"], numbers["train_benchmarks"]
    heldout_part = f"{_counts(heldout_from)}; " if heldout_from else ""
    train_part = f" ({_counts(train_from)})" if train_from else ""
    lines = [f"# CosmoCore report (profile `{numbers['profile']}`)", "",
             f"Held-out tasks: {numbers['heldout_tasks']} ({heldout_part}{numbers['decoding']} decoding). Training: "
             f"{numbers['horizon']} iterations{budget} on {numbers['train_tasks']} tasks{train_part}. "
             f"Variants: {', '.join(variants)}; seeds: {', '.join(map(str, seeds))}."]
    if train_from and set(train_from) != set(heldout_from):
        lines.append(f"Cross-benchmark: trained on {', '.join(train_from)}, evaluated on {', '.join(heldout_from)} "
                     "(each benchmark split by task id hash, so no held-out task was trained on).")
    lines += ["", "## Claims", ""]
    lines += [f"- {c['sentence']}" for c in numbers["comparisons"]] or [f"- No `{TREATMENT}` run in this study: nothing to compare."]
    lines += ["", "## Held-out metrics", "",
              "Point estimates with 95% percentile-bootstrap intervals over tasks"
              + (" (and over seeds for the seed means)" if multi_seed else "") + ". TTC is measured on the training tasks.", "",
              "| policy | pass@1 [95% CI] | hallucination rate [95% CI] | TTC KM mean, iterations [95% CI] | "
              + ("TTC KM mean, optimizer updates [95% CI] | " if in_updates else "") + "TTC censored share |",
              "|---|---|---|---|" + ("---|" if in_updates else "") + "---|"]
    rows = dict(numbers["policies"]) | {f"{v} (mean of {len(ps)} seeds)": numbers["variants"][v] for v, ps in multi_seed.items()}
    for name, row in rows.items():
        keys = (PASS.key, HALLUCINATION.key, TTC.key) + ((TTC_UPDATES.key,) if in_updates else ())
        cells = [_with_ci(row.get(m)) for m in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(row.get('ttc_censored_share', float('nan')))} |")
    lines += _comparison_table(numbers["comparisons"]) + _buffer_table(numbers["buffer"])
    lines += _execution_table(numbers["execution_reasoning"])
    lines += ["", "## Plots", ""] + [f"![{name.removesuffix('.png').replace('_', ' ')}]({name})" for name in numbers["plots"]]
    lines += ["", "## Method", "",
              f"- Intervals: {method['resamples']} bootstrap resamples; tasks are resampled jointly across policies, "
              "so differences are paired on tasks; a variant's seeds are resampled on their own.",
              f"- Smallest detectable effect: for rates, a two-sided two-proportion z-test at alpha {fmt(method['alpha'])} with power "
              f"{fmt(method['power'])}, as many samples per arm as held-out tasks, from the control's rate; for TTC, "
              f"{fmt(method['z_mde'])} bootstrap standard errors of the difference."]
    if in_updates:
        lines.append("- TTC in optimizer updates counts the updates made between the iteration a failure was first seen and "
                     "the one it was corrected at; its Kaplan-Meier mean is restricted to the update budget for every variant "
                     "alike, so a variant that makes fewer updates (on-policy) is not judged on a shorter horizon.")
    lines.append("")
    return "\n".join(lines)


def _counts(per_benchmark: dict[str, int]) -> str:
    """`HumanEval 12, BigCodeBench 4`."""
    return ", ".join(f"{name} {count}" for name, count in per_benchmark.items())


def _execution_table(found: dict[str, dict[str, float]]) -> list[str]:
    if not found:
        return []
    lines = ["", "## Execution reasoning (CodeRL+)", "",
             "Given a reference solution and a test input, predict the output (greedy), as in CRUXEval-O.", "",
             "| policy | output accuracy | alignment reward | questions |", "|---|---|---|---|"]
    return lines + [f"| {p} | {fmt(m['exec_output_accuracy'])} | {fmt(m['exec_alignment_reward'])} | {int(m['exec_tasks'])} |"
                    for p, m in found.items()]


def _with_ci(estimate: dict | None) -> str:
    if estimate is None or np.isnan(estimate["value"]):
        return "—"
    return f"{fmt(estimate['value'])} [{fmt(estimate['ci_low'])}, {fmt(estimate['ci_high'])}]"


def _comparison_table(found: list[dict]) -> list[str]:
    if not found:
        return []
    lines = ["", "## CosmoCore against each control", "",
             "| control | metric | CosmoCore | control | difference [95% CI] | excludes 0 | smallest detectable |",
             "|---|---|---|---|---|---|---|"]
    for c in found:
        lines.append(f"| {c['control']} | {c['metric']} | {fmt(c['treatment_value'])} | {fmt(c['control_value'])} | "
                     f"{_with_ci(c['difference'])} | {'yes' if c['excludes_zero'] else 'no'} | {fmt(c['mde'])} |")
    return lines


def _buffer_table(buffer: dict[str, dict[str, float]]) -> list[str]:
    if not buffer:
        return []
    lines = ["", "## Buffer", "",
             "Gate shares of the rollouts, averaged over iterations (the gates' verdicts, whatever the variant stores); "
             "the measured replay rate of Dream Queue entries relative to the rest at the end (the paper reports about 5).", "",
             "| run | Dream Queue | regular | Prune Bin | Dream Queue replay rate | optimizer updates |", "|---|---|---|---|---|---|"]
    for policy, row in buffer.items():
        lines.append(f"| {policy} | {fmt(row.get('dream_share', float('nan')))} | {fmt(row.get('regular_share', float('nan')))} | "
                     f"{fmt(row.get('pruned_share', float('nan')))} | {fmt(row.get('dream_replay_rate', float('nan')))} | "
                     f"{row.get('optimizer_steps', '—')} |")
    return lines
