"""Affect targets on hand-made examples, the task history, and the tagger learning them."""

from __future__ import annotations

import copy
import doctest
from pathlib import Path

import numpy as np
import pytest
import torch

from cosmocore.config import AffectConfig, load_params
from cosmocore.data.records import Trajectory
from cosmocore.rl import affect
from cosmocore.rl.affect import (
    AffectTagger,
    LabelsError,
    affect_targets,
    fine_tune_on_labels,
    load_tagger,
    predict,
    save_tagger,
    train_tagger,
    update_task_stats,
)
from cosmocore.rl.loop import LoopState, tag

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg() -> AffectConfig:
    return load_params(ROOT / "params.yaml").affect.model_copy(update={"valence_scale": 2.0, "epochs": 40})


# ---- targets --------------------------------------------------------------------------------------


def test_valence_is_relative_to_the_tasks_expectation(cfg):
    rewards = np.array([1.0, -0.5, 1.0, 1.0, 0.0, 1.0])
    tasks = ["solved", "solved", "new", "new", "new", "new"]
    outcomes = ["passed", "runtime_error", "passed", "passed", "wrong_answer", "passed"]
    valence, _ = affect_targets(rewards, tasks, outcomes, np.zeros(6), {"solved": 0.95}, {}, cfg)
    # "solved" usually passes: a routine success is ≈ 0, a failure is strongly negative (clipped)
    assert valence[:2] == pytest.approx([2 * 0.05, -1.0])
    # "new" has no history: the baseline is this iteration's mean reward for it, 0.75
    assert valence[2:] == pytest.approx([0.5, 0.5, -1.0, 0.5])


def test_arousal_is_rarity_or_contradicted_confidence_not_abs_valence(cfg):
    tasks = ["t"] * 4
    outcomes = ["passed", "passed", "wrong_answer", "timeout"]
    rewards = np.array([1.0, 1.0, 0.0, 0.0])  # the two failures get the same reward, hence the same valence
    logprobs = np.log([0.9, 0.5, 0.9, 0.2])
    history = {"t": {"passed": 4.0, "wrong_answer": 2.0}}
    valence, arousal = affect_targets(rewards, tasks, outcomes, logprobs, {"t": 0.5}, history, cfg)
    # merged counts: passed 6, wrong_answer 3, timeout 1 (total 10)
    rarity = np.array([0.4, 0.4, 0.7, 0.9])
    # confidences 0.9, 0.5, 0.9, 0.2 as percentiles of the iteration: ranks 3.5, 2, 3.5, 1 of 4;
    # the successes beat the expected 0.5 (surprise = 1 − percentile), the failures fall short (= percentile)
    surprise = np.array([1 - 5 / 6, 1 - 1 / 3, 5 / 6, 0.0])
    assert arousal == pytest.approx(1 - (1 - rarity) * (1 - surprise))
    assert valence[0] == valence[1] and arousal[0] < arousal[1]  # the hesitant success is the surprising one
    assert valence[2] == valence[3] and arousal[2] > arousal[3]  # the confident failure is the surprising one
    assert not np.allclose(arousal, np.abs(valence))


def test_only_a_confident_routine_sample_is_calm(cfg):
    # a task the policy always passes: rarity 0, so arousal is the surprise alone
    rewards, tasks, outcomes = np.ones(3), ["t"] * 3, ["passed"] * 3
    _, arousal = affect_targets(rewards, tasks, outcomes, np.log([0.95, 0.7, 0.4]), {"t": 1.0}, {"t": {"passed": 9.0}}, cfg)
    assert arousal == pytest.approx([0.0, 0.5, 1.0])


def test_a_lone_sample_without_tokens_sits_mid_percentile(cfg):
    _, arousal = affect_targets(np.array([0.0]), ["t"], ["no_code"], np.array([np.nan]), {}, {}, cfg)
    assert arousal == pytest.approx([0.5])  # the only outcome so far (rarity 0), the only sample (percentile 0.5)


def test_doctest_examples():
    assert doctest.testmod(affect).failed == 0


def test_mismatched_columns_fail(cfg):
    with pytest.raises(ValueError, match="lengths"):
        affect_targets(np.zeros(2), ["t"], ["passed", "passed"], np.zeros(2), {}, {}, cfg)


def test_update_task_stats_is_a_pure_decayed_running_mean():
    expected = {"a": 1.0, "untouched": 0.3}
    counts = {"a": {"passed": 4.0, "timeout": 2.0}, "untouched": {"passed": 1.0}}
    before = copy.deepcopy((expected, counts))
    new_expected, new_counts = update_task_stats(
        expected, counts, np.array([0.0, 1.0, -0.5]), ["a", "a", "b"], ["wrong_answer", "passed", "timeout"], decay=0.5
    )
    assert (expected, counts) == before  # inputs unchanged
    assert new_expected == pytest.approx({"a": 0.5 * 1.0 + 0.5 * 0.5, "untouched": 0.3, "b": -0.5})
    assert new_counts["a"] == pytest.approx({"passed": 3.0, "timeout": 1.0, "wrong_answer": 1.0})
    assert new_counts["b"] == {"timeout": 1.0} and new_counts["untouched"] == {"passed": 1.0}


# ---- the tagger -----------------------------------------------------------------------------------


def synthetic(n: int, seed: int, features: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hidden states that carry the signal (a linear and a nonlinear direction), at an LM-like offset and scale."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, features))
    valence = np.tanh(z[:, 0] - 0.5 * z[:, 1])
    arousal = 1 / (1 + np.exp(-(z[:, 2] ** 2 - 1)))
    return 40.0 + 8.0 * z, valence, arousal


def test_tagger_learns_held_out_targets(cfg):
    hidden, valence, arousal = synthetic(400, seed=0)
    rng_state = torch.get_rng_state()
    tagger, metrics = train_tagger(None, hidden, valence, arousal, cfg, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global torch RNG is left alone
    assert (metrics["n_train"], metrics["n_holdout"]) == (300, 100)
    assert metrics["valence_corr"] > 0.8 and metrics["arousal_corr"] > 0.5
    assert metrics["valence_mse"] < np.var(valence)

    fresh_hidden, fresh_valence, _ = synthetic(200, seed=1)
    predicted_valence, predicted_arousal = predict(tagger, fresh_hidden)
    assert np.corrcoef(predicted_valence, fresh_valence)[0, 1] > 0.8
    assert np.all(np.abs(predicted_valence) <= 1) and np.all((predicted_arousal >= 0) & (predicted_arousal <= 1))


def test_training_continues_an_existing_tagger(cfg):
    hidden, valence, arousal = synthetic(200, seed=2)
    few_epochs = cfg.model_copy(update={"epochs": 2})
    tagger, first = train_tagger(None, hidden, valence, arousal, few_epochs, seed=0)
    mean = tagger.input_mean.clone()
    same, second = train_tagger(tagger, hidden, valence, arousal, few_epochs, seed=0)
    assert same is tagger and torch.equal(tagger.input_mean, mean)  # normalisation fixed at creation
    assert second["valence_mse"] < first["valence_mse"]
    with pytest.raises(ValueError, match="features"):
        train_tagger(tagger, hidden[:, :5], valence, arousal, cfg, seed=0)


def test_too_few_held_out_rows_give_nan_correlations(cfg):
    hidden, valence, arousal = synthetic(8, seed=3)
    _, metrics = train_tagger(None, hidden, valence, arousal, cfg.model_copy(update={"epochs": 1}), seed=0)
    assert metrics["n_holdout"] == 2 and np.isnan(metrics["valence_corr"]) and np.isnan(metrics["arousal_corr"])


def test_tagger_checkpoint_round_trips(cfg, tmp_path):
    hidden, valence, arousal = synthetic(50, seed=4)
    tagger, _ = train_tagger(None, hidden, valence, arousal, cfg.model_copy(update={"epochs": 1}), seed=0)
    save_tagger(tagger, tmp_path / "tagger.pt")
    loaded = load_tagger(tmp_path / "tagger.pt")
    assert isinstance(loaded, AffectTagger)
    for a, b in zip(predict(tagger, hidden), predict(loaded, hidden)):
        assert np.array_equal(a, b)


# ---- human labels ---------------------------------------------------------------------------------


def test_fine_tune_on_labels_counts_unknown_ids(cfg, tmp_path):
    hidden, valence, arousal = synthetic(60, seed=5)
    tagger, _ = train_tagger(None, hidden, valence, arousal, cfg.model_copy(update={"epochs": 1}), seed=0)
    hidden_by_id = {f"traj-{i}": row for i, row in enumerate(hidden)}
    lines = ["trajectory_id,valence,arousal"] + [f"traj-{i},{valence[i]:.4f},{arousal[i]:.4f}" for i in range(40)]
    lines.append("not-in-buffer,0.5,0.5")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    metrics = fine_tune_on_labels(tagger, hidden_by_id, str(tmp_path / "labels.csv"), cfg, seed=0)
    assert (metrics["n_labels"], metrics["n_matched"], metrics["n_unknown"]) == (41, 40, 1)
    assert metrics["n_train"] + metrics["n_holdout"] == 40


@pytest.mark.parametrize(
    "content, message",
    [
        ("trajectory_id,valence\na,0.1\n", "missing column.*arousal"),
        ("trajectory_id,valence,arousal\na,0.1,0.2\nb,high,0.2\n", r"labels.csv:3: column 'valence' is 'high'"),
        ("trajectory_id,valence,arousal\na,0.1,1.5\n", r"labels.csv:2: column 'arousal' is 1.5, outside"),
        ("trajectory_id,valence,arousal\na,0.1,0.2\na,0.3,0.2\n", r"labels.csv:3: .*already labelled on line 2"),
    ],
)
def test_bad_label_files_are_explained(cfg, tmp_path, content, message):
    (tmp_path / "labels.csv").write_text(content)
    tagger = AffectTagger(4, 8)
    with pytest.raises(LabelsError, match=message):
        fine_tune_on_labels(tagger, {"a": np.zeros(4)}, tmp_path / "labels.csv", cfg, seed=0)


def test_missing_label_file_is_explained(cfg, tmp_path):
    with pytest.raises(LabelsError, match="not found.*labels_csv"):
        fine_tune_on_labels(AffectTagger(4, 8), {}, tmp_path / "absent.csv", cfg, seed=0)


def labelled_iteration(n: int = 48) -> list[Trajectory]:
    """An iteration of `cosmocore-s0` whose ids `labels/example.csv` names (tasks 0-5, sample 0)."""
    rng = np.random.default_rng(3)
    trajectories = []
    for i in range(n):
        task, sample = i // 4, i % 4
        passed = sample != 0
        trajectories.append(Trajectory(
            trajectory_id=f"cosmocore-s0/i0/HumanEval/{task}/{sample}", run="cosmocore-s0", variant="cosmocore", seed=0,
            iteration=0, task_id=f"HumanEval/{task}", sample=sample, kind="code", prompt_ids=[1], completion_ids=[2],
            behaviour_logprobs=[-0.5], mean_entropy=1.0, hidden=list(rng.normal(size=8) + 2.0 * (sample == 0)),
            text="", code="", outcome="passed" if passed else "wrong_answer", hallucinated=False,
            hallucination_evidence="", exception_type="", test_share=float("nan"), reward=1.0 if passed else 0.0))
    return trajectories


def test_tagging_fine_tunes_on_the_human_labels_of_params(cfg):
    labelled_ids = {row.split(",")[0] for row in (ROOT / "labels" / "example.csv").read_text().splitlines()[1:]}
    valences = {}
    for labels_csv in ("", str(ROOT / "labels" / "example.csv")):
        trajectories = labelled_iteration()
        _, metrics = tag(trajectories, LoopState(), cfg.model_copy(update={"labels_csv": labels_csv}), seed=0)
        valences[labels_csv] = np.mean([t.valence for t in trajectories if t.trajectory_id in labelled_ids])
    assert (metrics["tagger_labels_n_matched"], metrics["tagger_labels_n_unknown"]) == (len(labelled_ids), 0)
    without, with_labels = valences.values()
    assert with_labels > without + 0.1  # a person judged these failures harmless; execution alone said painful


def test_a_labels_file_outside_the_labels_folder_is_refused(cfg):
    with pytest.raises(ValueError, match="under labels/"):
        AffectConfig(**{**cfg.model_dump(), "labels_csv": "data/my_labels.csv"})
