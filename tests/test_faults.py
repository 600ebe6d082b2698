"""Bad input and a full disk: each gives a `CosmoCoreError` that names the file and the fix, and leaves
nothing half-written.

Task files (train/evaluate read them with `records.read_tasks`) are covered in test_datasets.py, model
folders in test_models.py; here: the trajectory tables the report and evaluate stages read back, a
benchmark file with a task that has no tests, and a disk that fills up during a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from cosmocore.data.records import Trajectory, RecordFileError, read_samples_log, write_trajectories
from cosmocore.errors import CosmoCoreError, DiskFull
from cosmocore.files import atomic_path

ROOT = Path(__file__).resolve().parents[1]


def _trajectory(i: int) -> Trajectory:
    return Trajectory(f"t{i}", "run", "cosmocore", 0, 0, "HumanEval/0", i, "code", [1, 2], [3], [-0.5], 0.4, [0.1],
                      "text", "code", "passed", False, "", "", float("nan"), 1.0)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_or_foreign_rollout_table_names_the_run_state_to_delete(tmp_path):
    from flows.report import _rollouts

    state = tmp_path / "runs" / "cosmocore-s0" / "state"
    for i in range(2):
        write_trajectories([_trajectory(i)], state / "rollouts" / f"iter_{i}.parquet")
    assert len(_rollouts(state)) == 2
    _truncate(state / "rollouts" / "iter_1.parquet")
    with pytest.raises(RecordFileError, match=r"iter_1\.parquet cannot be read .*delete the run's state folder") as caught:
        _rollouts(state)
    assert str(state) in str(caught.value) and isinstance(caught.value, CosmoCoreError)
    pd.DataFrame({"a": [1]}).to_parquet(state / "rollouts" / "iter_1.parquet")
    with pytest.raises(RecordFileError, match=r"iter_1\.parquet lacks the column\(s\) trajectory_id, run, "):
        _rollouts(state)


def test_a_truncated_or_foreign_samples_log_says_how_to_write_it_again(tmp_path):
    path = tmp_path / "samples_log.parquet"
    pd.DataFrame([{"iteration": 0, "task_id": "a", "outcome": "passed", "hallucinated": False}]).to_parquet(path)
    assert len(read_samples_log(path)) == 1
    _truncate(path)
    with pytest.raises(RecordFileError, match=r"samples_log\.parquet cannot be read .*re-run the run's train stage"):
        read_samples_log(path)
    path.write_bytes(b"")
    with pytest.raises(RecordFileError, match="cannot be read"):
        read_samples_log(path)
    pd.DataFrame({"iteration": [0], "task": ["a"]}).to_parquet(path)
    with pytest.raises(RecordFileError, match=r"lacks the column\(s\) task_id, outcome, hallucinated"):
        read_samples_log(path)


# ------------------------------------------------------------------------------------ benchmark files


def _bigcodebench_row(n: int, test: str | None) -> dict:
    row = {"task_id": f"BigCodeBench/{n}", "complete_prompt": f"def task_func(x):\n    \"\"\"Add {n}.\"\"\"\n",
           "instruct_prompt": f"Add {n} to x.", "canonical_solution": f"    return x + {n}\n", "entry_point": "task_func",
           "libs": "[]", "test": test}
    if test is None:
        del row["test"]
    return row


def _unittest(n: int) -> str:
    return (f"import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n"
            f"        self.assertEqual(task_func(1), {1 + n})\n")


def _prepare(tmp_path: Path, rows: list[dict], **data):
    from cosmocore.config import load_params
    from cosmocore.data.datasets import prepare

    source = tmp_path / "bcb.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    params = load_params(ROOT / "params.yaml")
    cfg = params.data.model_copy(update={"bigcodebench_path": str(source), "humaneval": False, "eval_fraction": 0.5,
                                         "max_train_tasks": 0, "max_eval_tasks": 0, **data})
    sandbox = params.sandbox.model_copy(update={"workers": 1, "preload_modules": []})
    return prepare(cfg, sandbox, tmp_path / "prepared")


def test_a_benchmark_task_without_tests_is_dropped_with_its_reason_and_counted(tmp_path, monkeypatch, caplog):
    """Schema validation drops it (an empty test) and logs why; it counts against data.max_invalid_fraction."""
    monkeypatch.delenv("COSMOCORE_BIGCODEBENCH", raising=False)
    rows = [_bigcodebench_row(n, _unittest(n)) for n in range(7)] + [_bigcodebench_row(7, "")]
    summary = _prepare(tmp_path, rows, max_invalid_fraction=0.2)
    assert list(summary["invalid"]) == ["BigCodeBench/7"] and "schema" in summary["invalid"]["BigCodeBench/7"]
    assert any("dropping task BigCodeBench/7" in record.message for record in caplog.records)
    assert summary["train"] + summary["eval"] == 7
    with pytest.raises(CosmoCoreError, match=r"1 of 8 bigcodebench tasks failed validation.*max_invalid_fraction"):
        _prepare(tmp_path, rows, max_invalid_fraction=0.1)


def test_a_benchmark_file_that_is_truncated_or_lacks_tests_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("COSMOCORE_BIGCODEBENCH", raising=False)
    with pytest.raises(CosmoCoreError, match=r"BigCodeBench/1 lacks \['test'\].*data\.bigcodebench_path"):
        _prepare(tmp_path, [_bigcodebench_row(0, _unittest(0)), _bigcodebench_row(1, None)])
    text = json.dumps(_bigcodebench_row(0, _unittest(0))) + "\n" + json.dumps(_bigcodebench_row(1, _unittest(1)))
    (tmp_path / "cut.jsonl").write_text(text[:-20])
    from cosmocore.config import load_params
    from cosmocore.data.datasets import load_bigcodebench

    cfg = load_params(ROOT / "params.yaml").data.model_copy(update={"bigcodebench_path": str(tmp_path / "cut.jsonl")})
    with pytest.raises(CosmoCoreError, match=r"cut\.jsonl:2: not valid JSON .*re-download the file"):
        load_bigcodebench(cfg)


# ---------------------------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_disk(folder: Path, size: int):
    """A tmpfs of `size` bytes mounted on `folder` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI and scripts/setup.sh run as root, so there it runs)")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_named_whichever_writer_hit_it(tmp_path):
    """Plain writes report ENOSPC; torch.save words it its own way ("unexpected pos"): both become
    DiskFull, the old file stays and no temporary is left."""
    import torch

    with small_disk(tmp_path / "disk", 1 << 20) as disk:
        (disk / "state.pt").write_bytes(b"old")
        for write in (lambda tmp: tmp.write_bytes(b"0" * (2 << 20)), lambda tmp: torch.save(torch.zeros(1 << 19), tmp)):
            with pytest.raises(DiskFull, match=r"no space left on the disk holding .*state\.pt was left as it was"):
                with atomic_path(disk / "state.pt") as tmp:
                    write(tmp)
            assert [p.name for p in disk.iterdir()] == ["state.pt"] and (disk / "state.pt").read_bytes() == b"old"


def test_a_checkpoint_on_a_full_disk_fails_clearly_and_the_previous_one_resumes(tmp_path, monkeypatch, config,
                                                                                 tiny_model_dir):
    from cosmocore.policy.models import load_policy
    from cosmocore.rl.run import latest_checkpoint
    from cosmocore.rl.trainer import build_learner, load_checkpoint, save_checkpoint

    model, tokenizer = load_policy(tiny_model_dir, config.model)
    learner = build_learner(model, config.train, tokenizer.pad_token_id, 1.0)
    learner.steps = 7
    save_checkpoint(learner, tmp_path / "sized" / "iter_0", {"loop": {"iteration": 1}})
    size = sum(p.stat().st_size for p in (tmp_path / "sized" / "iter_0").iterdir())
    with small_disk(tmp_path / "disk", size * 3 // 2) as state:  # room for one checkpoint, not two
        shutil.copytree(tmp_path / "sized" / "iter_0", state / "iter_0")
        learner.steps = 8
        with pytest.raises(DiskFull, match=r"no space left on the disk holding .*iter_1 was left as it was"):
            save_checkpoint(learner, state / "iter_1", {"loop": {"iteration": 2}})
        assert [p.name for p in state.iterdir()] == ["iter_0"] and latest_checkpoint(state) == state / "iter_0"
        fresh_model, _ = load_policy(tiny_model_dir, config.model)
        fresh = build_learner(fresh_model, config.train, tokenizer.pad_token_id, 1.0)
        assert load_checkpoint(fresh, state / "iter_0") == {"loop": {"iteration": 1}} and fresh.steps == 7
