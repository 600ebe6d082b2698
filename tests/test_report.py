"""The report against the files it was made from: synthetic evaluate and train outputs, shaped like the
real ones, are read by the report flow's reader and turned into the markdown and its numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cosmocore.data.records import Trajectory, write_trajectories
from cosmocore.evaluation.metrics import bootstrap_ci, minimum_detectable_effect, time_to_correction
from cosmocore.evaluation.report import TTC, Comparison, Estimate, build_report, fmt, render, split_policy
from flows.report import read_inputs

HELDOUT = [f"HumanEval/{i}" for i in range(24)]
TRAIN = [f"HumanEval/{i}" for i in range(100, 106)]
HORIZON = 4
UPDATES_PER_ITERATION = 2
HORIZON_UPDATES = HORIZON * UPDATES_PER_ITERATION  # what `train.updates_budget` gives the evaluate and report flows
# Held-out flags per policy: (tasks passed, tasks hallucinated), as sets of task indices.
HELDOUT_FLAGS = {
    "base": ({0}, set(range(20))),  # hallucinates on 20 of 24: CosmoCore's drop from it must be detectable
    "on_policy-s0": ({0, 1, 2}, {3, 4, 5, 7, 8, 9, 10, 11}),
    "cosmocore-s0": ({0, 1, 3}, {4, 5, 6, 8, 9, 10}),  # two tasks fewer than on_policy: not detectable on 24 tasks
}
SECOND_SEED = {"cosmocore-s1": ({0, 1, 2, 3}, {4, 5})}


def _trajectory(policy: str, iteration: int, task_id: str, sample: int, outcome: str, hallucinated: bool,
                valence: float = float("nan"), arousal: float = float("nan")) -> Trajectory:
    variant, seed = split_policy(policy)
    return Trajectory(
        trajectory_id=f"{policy}/{iteration}/{task_id}/{sample}", run=policy, variant=variant, seed=seed or 0,
        iteration=iteration, task_id=task_id, sample=sample, kind="code", prompt_ids=[1, 2], completion_ids=[3],
        behaviour_logprobs=[-0.5], mean_entropy=0.4, hidden=[0.0, 1.0], text="x", code="x", outcome=outcome,
        hallucinated=hallucinated, hallucination_evidence="", exception_type="", test_share=float("nan"), reward=0.0,
        valence=valence, arousal=arousal, extra={"static": hallucinated, "runtime": False},
    )


def _training_log(policy: str, rng: np.random.Generator) -> pd.DataFrame:
    """Two samples per training task and iteration; CosmoCore fails less often as training goes on."""
    fail = 0.3 if policy.startswith("cosmocore") else 0.6
    rows = [{"iteration": i, "task_id": t, "outcome": "runtime_error" if rng.random() < fail else "passed",
             "hallucinated": bool(rng.random() < fail / 2), "optimizer_steps": UPDATES_PER_ITERATION * (i + 1)}
            for i in range(HORIZON) for t in TRAIN for _ in range(2)]
    return pd.DataFrame(rows)


def _write_policy(root: Path, policy: str, rng: np.random.Generator) -> None:
    passed, hallucinated = (HELDOUT_FLAGS | SECOND_SEED)[policy]
    samples = [_trajectory(policy, 0, t, 0, "passed" if i in passed else "wrong_answer", i in hallucinated)
               for i, t in enumerate(HELDOUT)]
    write_trajectories(samples, root / "eval" / policy / "greedy_samples.parquet")
    metrics = {"greedy_pass_at_1": len(passed) / len(HELDOUT), "greedy_hallucination_rate": len(hallucinated) / len(HELDOUT),
               "tasks": len(HELDOUT)}
    if policy != "base":
        run = root / "runs" / policy
        log = _training_log(policy, rng)
        run.mkdir(parents=True)
        log.to_parquet(run / "samples_log.parquet", index=False)
        metrics |= {f"ttc_{k}": v for k, v in time_to_correction(log, HORIZON).items()}
        metrics["ttc_updates_km_mean"] = time_to_correction(log, HORIZON_UPDATES, unit="updates")["km_mean"]
        pd.DataFrame({"iteration": range(HORIZON), "train_hallucination_rate": [0.4, 0.3, 0.2, 0.1],
                      "train_pass_rate": [0.2, 0.3, 0.4, 0.5], "train_reward": [-0.2, 0.0, 0.1, 0.3],
                      "gate_dream_share": [0.3, 0.2, 0.2, 0.1], "gate_regular_share": [0.5, 0.5, 0.4, 0.4],
                      "gate_pruned_share": [0.2, 0.3, 0.4, 0.5], "buffer_dream_replay_rate": [np.nan, 3.0, 4.0, 4.5],
                      "optimizer_steps": [2, 4, 6, 8]}).to_csv(run / "history.csv", index=False)
        for i in range(HORIZON):
            rollouts = [_trajectory(policy, i, row.task_id, k, row.outcome, row.hallucinated, rng.uniform(-1, 1), rng.uniform(0, 1))
                        for k, row in enumerate(log[log["iteration"] == i].itertuples())]
            write_trajectories(rollouts, run / "state" / "rollouts" / f"iter_{i}.parquet")
    (root / "metrics" / "eval").mkdir(parents=True, exist_ok=True)
    (root / "metrics" / "eval" / f"{policy}.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(7)
    for policy in HELDOUT_FLAGS:
        _write_policy(root, policy, rng)
    inputs = read_inputs("smoke", list(HELDOUT_FLAGS), HORIZON, True, root / "metrics" / "eval", root / "eval", root / "runs",
                         horizon_updates=HORIZON_UPDATES)
    markdown, numbers = build_report(inputs, root / "report")
    return root, inputs, markdown, numbers


def _comparison(numbers: dict, control: str, metric: str) -> dict:
    return next(c for c in numbers["comparisons"] if c["control"] == control and c["metric"] == metric)


def _leaves(payload) -> list:
    if isinstance(payload, dict):
        return [leaf for value in payload.values() for leaf in _leaves(value)]
    if isinstance(payload, list):
        return [leaf for value in payload for leaf in _leaves(value)]
    return [payload]


def test_report_states_the_metrics_files_numbers(made):
    root, _, markdown, numbers = made
    assert markdown.splitlines()[0] == "# CosmoCore report (profile `smoke`)"
    for policy in HELDOUT_FLAGS:
        stated = json.loads((root / "metrics" / "eval" / f"{policy}.json").read_text())
        row = numbers["policies"][policy]
        assert row["pass_at_1"]["value"] == pytest.approx(stated["greedy_pass_at_1"])
        assert row["hallucination_rate"]["value"] == pytest.approx(stated["greedy_hallucination_rate"])
        cells = [row[m]["value"] for m in ("pass_at_1", "hallucination_rate")]
        if policy != "base":
            for key in ("ttc_km_mean", "ttc_updates_km_mean"):
                assert row[key]["value"] == pytest.approx(stated[key])
                cells.append(row[key]["value"])
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {policy} |"))
        assert all(fmt(value) in line for value in cells)


def test_every_number_in_the_markdown_is_in_the_numbers(made):
    _, _, markdown, numbers = made
    stated = {fmt(v) for v in _leaves(numbers) if isinstance(v, float)}
    assert set(re.findall(r"-?\d+\.\d+", markdown)) <= stated


def test_intervals_contain_their_point_estimates(made):
    _, _, _, numbers = made
    estimates = [e for row in [*numbers["policies"].values(), *numbers["variants"].values()] for e in row.values()
                 if isinstance(e, dict)] + [c["difference"] for c in numbers["comparisons"]]
    assert estimates
    for e in estimates:
        assert e["ci_low"] - 1e-9 <= e["value"] <= e["ci_high"] + 1e-9


def test_single_seed_interval_is_the_metrics_bootstrap_over_tasks(made):
    _, _, _, numbers = made
    passed = np.isin(np.arange(len(HELDOUT)), sorted(HELDOUT_FLAGS["cosmocore-s0"][0])).astype(float)
    hallucinated_on = np.isin(np.arange(len(HELDOUT)), sorted(HELDOUT_FLAGS["on_policy-s0"][1])).astype(float)
    hallucinated_co = np.isin(np.arange(len(HELDOUT)), sorted(HELDOUT_FLAGS["cosmocore-s0"][1])).astype(float)
    row = numbers["policies"]["cosmocore-s0"]["pass_at_1"]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(bootstrap_ci(passed))
    paired = _comparison(numbers, "on_policy", "hallucination_rate")["difference"]
    assert (paired["ci_low"], paired["ci_high"]) == pytest.approx(bootstrap_ci(hallucinated_co - hallucinated_on))


def test_a_null_result_is_worded_as_undetectable_with_its_mde(made):
    _, _, markdown, numbers = made
    null = _comparison(numbers, "on_policy", "hallucination_rate")
    assert null["difference"]["ci_low"] < 0 < null["difference"]["ci_high"] and not null["excludes_zero"]
    assert null["mde"] == pytest.approx(minimum_detectable_effect(len(HELDOUT), 8 / 24))
    sentence = null["sentence"]
    assert sentence.startswith("CosmoCore lowers held-out hallucination rate against on_policy from 0.333 to 0.250")
    assert "the interval includes 0, so this run cannot tell them apart" in sentence
    assert f"the smallest drop it could detect is {fmt(null['mde'])}" in sentence
    assert sentence in markdown


def test_a_detectable_drop_is_worded_as_one(made):
    _, _, markdown, numbers = made
    drop = _comparison(numbers, "base", "hallucination_rate")
    assert drop["excludes_zero"] and drop["difference"]["ci_high"] < 0
    assert "the interval excludes 0, so at this budget CosmoCore is better on this measure" in drop["sentence"]
    assert drop["sentence"] in markdown
    assert not any(c["control"] == "base" and c["metric"] == "ttc_km_mean" for c in numbers["comparisons"])
    ttc = _comparison(numbers, "on_policy", "ttc_km_mean")
    assert ttc["mde"] > 0 and fmt(ttc["mde"]) in ttc["sentence"]


def test_time_to_correction_in_updates_is_compared_and_plotted(made):
    _, _, markdown, numbers = made
    iterations, updates = _comparison(numbers, "on_policy", "ttc_km_mean"), _comparison(numbers, "on_policy", "ttc_updates_km_mean")
    # Every iteration makes the same number of updates here, so updates are that many times iterations.
    for key in ("treatment_value", "control_value"):
        assert updates[key] == pytest.approx(UPDATES_PER_ITERATION * iterations[key])
    assert "time to correction (Kaplan-Meier mean, optimizer updates)" in updates["sentence"] and updates["sentence"] in markdown
    assert f"at most {HORIZON_UPDATES} optimizer updates" in markdown and numbers["horizon_updates"] == HORIZON_UPDATES
    assert "TTC KM mean, optimizer updates [95% CI]" in markdown


def test_the_report_says_which_benchmarks_the_tasks_come_from(made):
    _, _, markdown, numbers = made
    assert numbers["heldout_benchmarks"] == {"HumanEval": len(HELDOUT)} and numbers["train_benchmarks"] == {"HumanEval": len(TRAIN)}
    assert f"Held-out tasks: {len(HELDOUT)} (HumanEval {len(HELDOUT)}; greedy decoding)" in markdown
    assert f"on {len(TRAIN)} tasks (HumanEval {len(TRAIN)})" in markdown and "Cross-benchmark" not in markdown
    cross = render({**numbers, "heldout_benchmarks": {"BigCodeBench": len(HELDOUT)}}, {})
    assert "Cross-benchmark: trained on HumanEval, evaluated on BigCodeBench" in cross


def test_without_an_update_horizon_ttc_is_reported_in_iterations_only(made, tmp_path):
    _, inputs, _, _ = made
    markdown, numbers = build_report(type(inputs)(**{**inputs.__dict__, "horizon_updates": None}), tmp_path)
    assert not any(c["metric"] == "ttc_updates_km_mean" for c in numbers["comparisons"])
    assert "TTC KM mean, optimizer updates" not in markdown and "Kaplan-Meier mean, optimizer updates" not in markdown
    assert "ttc_updates_km_mean" not in numbers["policies"]["cosmocore-s0"]


def test_plots_exist(made):
    root, _, markdown, numbers = made
    assert set(numbers["plots"]) == {"heldout.png", "learning_curves.png", "buffer_composition.png", "affect_scatter.png"}
    for name in numbers["plots"]:
        assert (root / "report" / name).stat().st_size > 1000
        assert f"]({name})" in markdown


def test_stale_metrics_file_is_refused(made, tmp_path):
    root, inputs, _, _ = made
    stale = dict(inputs.eval_metrics, base={**inputs.eval_metrics["base"], "greedy_pass_at_1": 0.5})
    with pytest.raises(ValueError, match="out of date"):
        build_report(type(inputs)(**{**inputs.__dict__, "eval_metrics": stale}), tmp_path)
    stale = dict(inputs.eval_metrics, **{"on_policy-s0": {**inputs.eval_metrics["on_policy-s0"], "ttc_updates_km_mean": 99.0}})
    with pytest.raises(ValueError, match="ttc_updates_km_mean"):
        build_report(type(inputs)(**{**inputs.__dict__, "eval_metrics": stale}), tmp_path)


def test_a_variant_with_several_seeds_is_reported_as_their_mean(tmp_path):
    rng = np.random.default_rng(7)
    policies = [*HELDOUT_FLAGS, *SECOND_SEED]
    for policy in policies:
        _write_policy(tmp_path, policy, rng)
    inputs = read_inputs("smoke", policies, HORIZON, True, tmp_path / "metrics" / "eval", tmp_path / "eval", tmp_path / "runs",
                         horizon_updates=HORIZON_UPDATES)
    markdown, numbers = build_report(inputs, tmp_path / "report")
    seeds = [numbers["policies"][p]["hallucination_rate"]["value"] for p in ("cosmocore-s0", "cosmocore-s1")]
    mean = numbers["variants"]["cosmocore"]["hallucination_rate"]
    assert numbers["variants"]["cosmocore"]["seeds"] == [0, 1]
    assert mean["value"] == pytest.approx(np.mean(seeds)) and mean["ci_low"] <= mean["value"] <= mean["ci_high"]
    assert _comparison(numbers, "on_policy", "hallucination_rate")["treatment_value"] == pytest.approx(np.mean(seeds))
    assert "| cosmocore (mean of 2 seeds) | " in markdown


def test_a_measure_without_values_is_said_to_be_unmeasured():
    nan = float("nan")
    unmeasured = Comparison(TTC, "on_policy", nan, 2.0, Estimate(nan, np.full(10, nan)), nan, 6)
    assert not unmeasured.excludes_zero
    assert unmeasured.sentence().startswith("CosmoCore and on_policy cannot be compared on time to correction")
    assert "measured none for cosmocore" in unmeasured.sentence()
