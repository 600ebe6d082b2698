"""Great Expectations checks at the stage boundaries report the offending rows by id."""

from __future__ import annotations

import dataclasses

import pytest

from cosmocore.data.datasets import load_humaneval
from cosmocore.data.records import Trajectory, trajectories_to_frame
from cosmocore.data.validation import ValidationFailed, raise_for_failures, validate_tasks, validate_trajectories


def test_valid_tasks_pass():
    assert validate_tasks(load_humaneval()[:10]).success


def test_bad_tasks_are_reported_by_id():
    tasks = load_humaneval()[:5]
    bad = [
        tasks[0],
        tasks[0],  # duplicate id
        dataclasses.replace(tasks[1], prompt=""),
        dataclasses.replace(tasks[2], entry_point="not an identifier"),
        dataclasses.replace(tasks[3], test=""),
        dataclasses.replace(tasks[4], benchmark="mbpp"),
    ]
    report = validate_tasks(bad)
    assert not report.success
    assert report.bad_ids == {"HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/3", "HumanEval/4"}
    assert report.reasons["HumanEval/2"] == ["expect_column_values_to_match_regex(entry_point)"]
    with pytest.raises(ValidationFailed, match=r"(?s)HumanEval/1.*re-run the stage"):
        raise_for_failures(report, "train.jsonl")


def _trajectory(i: int, **update) -> Trajectory:
    base = Trajectory(
        trajectory_id=f"r-{i}", run="r", variant="cosmocore", seed=0, iteration=0, task_id="HumanEval/0",
        sample=i, kind="code", prompt_ids=[1, 2], completion_ids=[3], behaviour_logprobs=[-0.5],
        mean_entropy=0.4, hidden=[0.1, 0.2], text="x", code="x", outcome="passed", hallucinated=False,
        hallucination_evidence="", exception_type="", test_share=float("nan"), reward=1.0,
    )
    return dataclasses.replace(base, **update)


def test_trajectory_table_checks():
    good = [_trajectory(0), _trajectory(1, valence=-0.7, arousal=0.9)]  # untagged NaN affect is fine
    assert validate_trajectories(trajectories_to_frame(good)).success
    bad = good + [
        _trajectory(2, outcome="exploded"),
        _trajectory(3, reward=2.0),
        _trajectory(4, mean_entropy=-0.1),
        _trajectory(5, valence=-1.5),
        _trajectory(6, arousal=1.2),
        _trajectory(1),  # duplicate id
    ]
    report = validate_trajectories(trajectories_to_frame(bad))
    assert report.bad_ids == {"r-1", "r-2", "r-3", "r-4", "r-5", "r-6"}
    assert "expect_column_values_to_be_in_set(outcome)" in report.reasons["r-2"]


def test_a_missing_column_is_a_table_level_failure():
    frame = trajectories_to_frame([_trajectory(0)]).drop(columns=["reward"])
    report = validate_trajectories(frame)
    assert not report.success and not report.bad_ids
    assert any("reward" in failure for failure in report.failures)
