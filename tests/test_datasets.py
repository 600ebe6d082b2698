"""prepare's library: loading, the library filter, the hash split, caps, and the stage end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

from cosmocore.config import DataConfig, load_params
from cosmocore.data import datasets as ds
from cosmocore.data.records import RecordFileError, read_tasks, write_tasks

ROOT = Path(__file__).resolve().parents[1]
SHARED_BCB = ROOT.parent / "shared" / "data" / "bigcodebench"


def data_cfg(**update) -> DataConfig:
    return load_params(ROOT / "params.yaml").data.model_copy(update=update)


@pytest.fixture
def bcb_file() -> Path:
    folder = Path(os.environ.get(ds.ENV_BIGCODEBENCH, SHARED_BCB))
    files = [folder] if folder.is_file() else sorted(folder.glob("*.jsonl*"))
    if not files:
        pytest.skip(f"no local BigCodeBench file in {folder}: set {ds.ENV_BIGCODEBENCH}")
    return files[0]


@pytest.fixture
def offline_hub(monkeypatch):
    """Make the hub unreachable at once (the real client retries for ~25 s before giving up)."""
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'bigcode/bigcodebench' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.delenv(ds.ENV_BIGCODEBENCH, raising=False)


def test_humaneval_loads_from_the_package():
    tasks = ds.load_humaneval()
    assert len(tasks) == 164
    first = tasks[0]
    assert first.task_id == "HumanEval/0" and first.benchmark == "humaneval" and first.test_style == "humaneval"
    assert first.prompt.rstrip() in first.instruction and "def check(candidate)" in first.test


def test_bigcodebench_from_the_param_keeps_only_runnable_allowed_tasks(bcb_file, monkeypatch):
    monkeypatch.delenv(ds.ENV_BIGCODEBENCH, raising=False)
    cfg = data_cfg(bigcodebench_path=str(bcb_file), bigcodebench_allowed_libs=["numpy", "pandas"])
    tasks, report = ds.load_bigcodebench(cfg)
    assert report["total"] == 1140 and report["kept"] == len(tasks) == 540  # data/README.md: stdlib + numpy + pandas
    assert report["kept"] + sum(report["dropped"].values()) == report["total"]
    assert report["dropped"]["not allowed: matplotlib"] > 0
    task = tasks[0]
    assert task.benchmark == "bigcodebench" and task.test_style == "unittest" and isinstance(task.libs, tuple)
    assert "class TestCases" in task.test and task.instruction != task.prompt
    assert all(set(t.libs) <= set(sys.stdlib_module_names) | {"numpy", "pandas"} for t in tasks)


def test_bigcodebench_from_the_env_var_file_or_folder(bcb_file, monkeypatch):
    for value in (bcb_file, bcb_file.parent):
        monkeypatch.setenv(ds.ENV_BIGCODEBENCH, str(value))
        tasks, report = ds.load_bigcodebench(data_cfg(bigcodebench_path=""))
        assert report["source"] == str(value) and len(tasks) == report["kept"] > 0


def test_allowed_libs_accept_pip_names():
    assert ds.import_name("scikit-learn") == "sklearn" and ds.import_name("Pillow") == "PIL"
    assert ds.parse_libs("['os', 'numpy']") == ("os", "numpy") == ds.parse_libs(["os", "numpy"])
    task = ds._humaneval_task({"task_id": "t", "prompt": "", "entry_point": "f", "test": "", "canonical_solution": ""})
    with_libs = [dataclasses.replace(task, libs=libs) for libs in (("sklearn",), ("json",), ("no_such_lib_xyz",))]
    kept, report = ds.filter_by_libs(with_libs, ["scikit-learn"])
    assert [t.libs for t in kept] == [("sklearn",), ("json",)]
    assert report["dropped"] == {"not importable: no_such_lib_xyz": 1}


def test_missing_bigcodebench_says_how_to_provide_it(offline_hub):
    with pytest.raises(ds.DatasetUnavailable) as caught:
        ds.load_bigcodebench(data_cfg(bigcodebench_path=""))
    message = str(caught.value)
    assert "data.bigcodebench_path" in message and ds.ENV_BIGCODEBENCH in message and "network" in message


def test_a_given_path_that_does_not_exist_is_not_silently_replaced_by_the_hub(tmp_path, offline_hub):
    with pytest.raises(ds.DatasetUnavailable, match="does not exist"):
        ds.load_bigcodebench(data_cfg(bigcodebench_path=str(tmp_path / "nope.jsonl")))


def test_prepare_continues_with_humaneval_when_allowed(tmp_path, offline_hub, monkeypatch):
    from cosmocore.data import validation

    monkeypatch.setattr(validation, "check_reference_solutions", lambda tasks, cfg: {})
    sandbox_cfg = load_params(ROOT / "params.yaml").sandbox
    summary = ds.prepare(data_cfg(max_train_tasks=3, max_eval_tasks=3), sandbox_cfg, tmp_path)
    assert "data.bigcodebench_path" in summary["bigcodebench_missing"]
    assert list(summary["benchmarks"]) == ["humaneval"] and summary["train"] == summary["eval"] == 3
    json.dumps(summary)  # the flow writes it as summary.json
    with pytest.raises(ds.DatasetUnavailable):
        ds.prepare(data_cfg(allow_missing_bigcodebench=False), sandbox_cfg, tmp_path)


def test_prepare_fails_when_too_many_reference_solutions_fail(tmp_path, monkeypatch):
    from cosmocore.data import validation

    two_fail = lambda tasks, cfg: {t.task_id: "timeout" for t in tasks[:2]}  # noqa: E731
    monkeypatch.setattr(validation, "check_reference_solutions", two_fail)
    sandbox_cfg = load_params(ROOT / "params.yaml").sandbox
    with pytest.raises(ValueError, match="max_invalid_fraction"):
        ds.prepare(data_cfg(bigcodebench=False, max_train_tasks=3, max_eval_tasks=3), sandbox_cfg, tmp_path)


def test_split_is_deterministic_disjoint_and_by_id_not_position():
    tasks = ds.load_humaneval()
    train, held_out = ds.split_tasks(tasks, 0.5, seed=0)
    assert ds.split_tasks(tasks, 0.5, seed=0) == (train, held_out)
    assert not {t.task_id for t in train} & {t.task_id for t in held_out} and len(train) + len(held_out) == 164
    assert 50 < len(held_out) < 114
    reversed_train, reversed_eval = ds.split_tasks(tasks[::-1], 0.5, seed=0)
    assert {t.task_id for t in reversed_eval} == {t.task_id for t in held_out}
    assert {t.task_id for t in ds.split_tasks(tasks, 0.5, seed=1)[1]} != {t.task_id for t in held_out}
    assert [t.task_id for t in held_out] != [t.task_id for t in tasks[: len(held_out)]]


def test_cap_is_a_stable_hash_subset_in_original_order():
    tasks = ds.load_humaneval()
    small, large = ds.cap(tasks, 5, seed=0), ds.cap(tasks, 20, seed=0)
    assert len(small) == 5 and set(small) <= set(large)
    assert small == ds.cap(tasks[::-1], 5, seed=0)[::-1]
    assert ds.cap(tasks, 0, seed=0) == tasks


def test_a_missing_or_corrupt_task_file_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "train.jsonl"
    with pytest.raises(RecordFileError, match=r"train\.jsonl not found: .*`dvc repro prepare`"):
        read_tasks(path)
    write_tasks(ds.load_humaneval()[:2], path)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:40])  # the last line cut short
    with pytest.raises(RecordFileError, match=r"train\.jsonl:2: corrupt task record .*`dvc repro prepare`"):
        read_tasks(path)
    path.write_text(json.dumps({"task_id": "x"}) + "\n")  # other fields
    with pytest.raises(RecordFileError, match=r"train\.jsonl:1: corrupt task record \(expected fields"):
        read_tasks(path)


def test_prepare_end_to_end_with_the_sandbox(tmp_path, bcb_file, monkeypatch):
    monkeypatch.delenv(ds.ENV_BIGCODEBENCH, raising=False)
    cfg = data_cfg(bigcodebench_path=str(bcb_file), max_train_tasks=3, max_eval_tasks=3, max_invalid_fraction=0.5)
    summary = ds.prepare(cfg, load_params(ROOT / "params.yaml").sandbox, tmp_path)
    train, held_out = read_tasks(tmp_path / "train.jsonl"), read_tasks(tmp_path / "eval.jsonl")
    assert {t.benchmark for t in train} == {t.benchmark for t in held_out} == {"humaneval", "bigcodebench"}
    assert not {t.task_id for t in train} & {t.task_id for t in held_out}
    assert len(train) + len(held_out) + len(summary["invalid"]) == 12
    assert summary["benchmarks"]["humaneval"]["invalid"] == 0  # every HumanEval reference passes


def test_evaluation_refuses_a_task_of_the_training_split():
    from cosmocore.data.datasets import SplitLeak, guard_split

    guard_split({"HumanEval/1", "HumanEval/2"}, {"HumanEval/3"})  # disjoint: fine
    with pytest.raises(SplitLeak, match="HumanEval/2"):
        guard_split({"HumanEval/1", "HumanEval/2"}, {"HumanEval/2", "HumanEval/3"})


@pytest.mark.parametrize("trained, evaluated", [("humaneval", "bigcodebench"), ("bigcodebench", "humaneval")])
def test_cross_benchmark_trains_on_one_split_and_evaluates_on_the_others_held_out_split(
    tmp_path, bcb_file, monkeypatch, trained, evaluated
):
    from cosmocore.data import validation

    monkeypatch.delenv(ds.ENV_BIGCODEBENCH, raising=False)
    monkeypatch.setattr(validation, "check_reference_solutions", lambda tasks, cfg: {})
    sandbox_cfg = load_params(ROOT / "params.yaml").sandbox
    both = data_cfg(bigcodebench_path=str(bcb_file), max_train_tasks=3, max_eval_tasks=4)
    ds.prepare(both, sandbox_cfg, tmp_path / "both")
    cross = both.model_copy(update={"train_benchmarks": [trained], "eval_benchmarks": [evaluated]})
    summary = ds.prepare(cross, sandbox_cfg, tmp_path / "cross")

    train, held_out = read_tasks(tmp_path / "cross" / "train.jsonl"), read_tasks(tmp_path / "cross" / "eval.jsonl")
    assert {t.benchmark for t in train} == {trained} and {t.benchmark for t in held_out} == {evaluated}
    # The same hash split: each side is exactly that benchmark's side of the run that uses both.
    both_train, both_eval = read_tasks(tmp_path / "both" / "train.jsonl"), read_tasks(tmp_path / "both" / "eval.jsonl")
    assert train == [t for t in both_train if t.benchmark == trained]
    assert held_out == [t for t in both_eval if t.benchmark == evaluated]
    loaded = {"humaneval": ds.load_humaneval(), "bigcodebench": ds.load_bigcodebench(cross)[0]}
    assert {t.task_id for t in held_out} <= {t.task_id for t in ds.split_tasks(loaded[evaluated], 0.5, 0)[1]}
    ds.guard_split({t.task_id for t in held_out}, {t.task_id for t in train})
    assert summary["train_benchmarks"] == [trained] and summary["eval_benchmarks"] == [evaluated]
    assert summary["benchmarks"] == {
        trained: {"selected": 3, "invalid": 0, "train": 3, "eval": 0},
        evaluated: {"selected": 4, "invalid": 0, "train": 0, "eval": 4},
    }
    assert summary["train"] == 3 and summary["eval"] == 4


def test_a_missing_benchmark_chosen_alone_for_a_side_fails_saying_how_to_provide_it(tmp_path, offline_hub, monkeypatch):
    from cosmocore.data import validation

    monkeypatch.setattr(validation, "check_reference_solutions", lambda tasks, cfg: {})
    sandbox_cfg = load_params(ROOT / "params.yaml").sandbox
    cross = data_cfg(bigcodebench_path="", train_benchmarks=["humaneval"], eval_benchmarks=["bigcodebench"])
    with pytest.raises(ds.DatasetUnavailable) as caught:
        ds.prepare(cross, sandbox_cfg, tmp_path)
    message = str(caught.value)
    assert "data.eval_benchmarks chooses bigcodebench" in message and "nothing to evaluate on" in message
    assert ds.ENV_BIGCODEBENCH in message and not (tmp_path / "eval.jsonl").exists()
    # Another chosen benchmark remains on that side: go on without BigCodeBench, as allowed.
    summary = ds.prepare(data_cfg(bigcodebench_path="", max_train_tasks=2, max_eval_tasks=2,
                                  train_benchmarks=["humaneval", "bigcodebench"], eval_benchmarks=["humaneval"]),
                         sandbox_cfg, tmp_path)
    assert summary["train_benchmarks"] == summary["eval_benchmarks"] == ["humaneval"] and "bigcodebench_missing" in summary


def test_choosing_a_disabled_benchmark_fails_naming_the_key():
    import yaml

    from cosmocore.config import ConfigError, resolve_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["data"]["train_benchmarks"] == raw["data"]["eval_benchmarks"] == []  # default: every enabled benchmark
    raw["data"] |= {"bigcodebench": False, "eval_benchmarks": ["bigcodebench"]}
    with pytest.raises(ConfigError, match=r"'data\.eval_benchmarks': .*data\.bigcodebench: false"):
        resolve_params(raw)
    raw["data"] |= {"eval_benchmarks": ["mbpp"]}
    with pytest.raises(ConfigError, match=r"'data\.eval_benchmarks"):
        resolve_params(raw)
    raw["data"] |= {"eval_benchmarks": [], "train_benchmarks": ["humaneval"]}
    assert ds.chosen_benchmarks(resolve_params(raw).data) == {"train": ["humaneval"], "eval": ["humaneval"]}
