"""A training run killed at any point resumes from the last checkpoint and buffer with nothing lost or
duplicated, and a change of configuration starts afresh.

The real training flow (`python -m flows.train`, Prefect, sandbox, MLflow) runs on the tiny model and
two HumanEval tasks in a scratch copy of the repository layout; it is SIGKILLed as soon as the first
iteration's checkpoint appears, restarted, and its outputs are checked against what the killed run had
checkpointed. A unit check covers the checkpoint's atomicity: a save that dies half-way leaves the
previous checkpoint the latest one, and loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

VARIANT, SEED = "cosmocore", 0
ITERATIONS = 2  # iteration 1 runs only after the restart
RUN = f"{VARIANT}-s{SEED}"


def _write_config(repo: Path, **train_changes) -> None:
    """`cosmocore config` on the smoke profile, with `ITERATIONS` iterations (and any other train changes)."""
    from cosmocore.config import resolve_params, write_sections

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["profile"] = "smoke"
    raw["profiles"]["smoke"].setdefault("train", {}).update({"iterations": ITERATIONS, **train_changes})
    write_sections(resolve_params(raw), repo / "data" / "config")


def make_scratch(root: Path, tiny_model_dir: Path, n_tasks: int = 2, **train_changes) -> tuple[Path, dict]:
    """A repository layout under `root` with config (`_write_config`), `n_tasks` prepared tasks and the tiny
    model; the flows are copied so that everything a run writes (MLflow artifacts included) stays under
    `root`, with Prefect's and MLflow's databases. Returns the repository and the environment to run in."""
    from cosmocore.data.datasets import load_humaneval
    from cosmocore.data.records import write_tasks

    repo = root / "repo"
    shutil.copytree(REPO / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    _write_config(repo, **train_changes)
    write_tasks(load_humaneval()[:n_tasks], repo / "data/prepared/train.jsonl")
    write_tasks(load_humaneval()[n_tasks : 2 * n_tasks], repo / "data/prepared/eval.jsonl")
    shutil.copytree(tiny_model_dir, repo / "data/model/base")
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "1000",  # Prefect's console logger must not wrap the lines checked below
    }
    return repo, env


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    repo, env = make_scratch(root, tiny_model_dir)
    shutil.copytree(repo, root / "reference")  # for an uninterrupted run to compare with
    return repo, root / "reference", env, 2


def _start(repo: Path, env: dict, log: Path, stage: tuple[str, ...] = ("-m", "flows.train")) -> subprocess.Popen:
    """Start the training stage (`stage`: how Python is told to run it) in a session of its own."""
    with log.open("w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, *stage, "--variant", VARIANT, "--seed", str(SEED)],
                                cwd=repo, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = log.read_text()
    assert process.returncode == 0, f"training flow failed ({process.returncode}):\n{text[-5000:]}"
    return text


def _kill_when(process: subprocess.Popen, log: Path, ready, timeout: float = 300) -> None:
    """SIGKILL the run (its whole process group: sandbox workers too) as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, f"gave up waiting:\n{log.read_text()[-5000:]}"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _buffer_ids(path: Path, repo: Path) -> list[str]:
    from cosmocore.rl.buffer import ReplayBuffer
    from cosmocore.config import BufferConfig, load_section

    buffer = ReplayBuffer.load(path, load_section(repo / "data/config", BufferConfig))
    return [entry["trajectory_id"] for entry in buffer.entries()]


@pytest.mark.slow
def test_a_killed_run_resumes_without_losing_or_repeating_anything(scratch):
    repo, reference, env, n_tasks = scratch

    # an uninterrupted run to compare with, alongside (most of a run's wall time is start-up and waiting),
    # with its own Prefect and MLflow databases
    own = {"PREFECT_HOME": str(reference.parent / "prefect-home-reference"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{reference.parent / 'mlruns-reference.db'}"}
    uninterrupted = _start(reference, {**env, **own}, reference / "run.log")
    try:
        _kill_and_resume(repo, reference, env, n_tasks, uninterrupted)
    finally:
        if uninterrupted.poll() is None:
            os.killpg(uninterrupted.pid, signal.SIGKILL)
            uninterrupted.wait()


def _kill_and_resume(repo: Path, reference: Path, env: dict, n_tasks: int, uninterrupted: subprocess.Popen) -> None:
    cfg = json.loads((repo / "data/config/train.json").read_text())
    samples = json.loads((repo / "data/config/rollout.json").read_text())["samples_per_task"] * n_tasks
    run_dir = repo / "data/runs" / RUN
    state_dir = run_dir / "state"

    # 1. kill the run right after iteration 0's checkpoint is complete (it is renamed into place whole)
    first = _start(repo, env, repo / "first.log")
    _kill_when(first, repo / "first.log", lambda: (state_dir / "iter_0").is_dir())
    killed_at = sorted(p.name for p in state_dir.glob("iter_*[0-9]"))
    assert killed_at and killed_at[0] == "iter_0"
    checkpointed = {name: _buffer_ids(state_dir / name / "buffer.pt", repo) for name in killed_at}
    assert not (run_dir / "history.csv").exists()  # the killed run never finished

    # 2. restart: it resumes after the last complete checkpoint and runs to the end
    text = _finish(_start(repo, env, repo / "second.log"), repo / "second.log")
    last = int(killed_at[-1].split("_")[1])
    assert f"{RUN}: resuming after iteration {last} from" in text, text[-5000:]
    assert "starting afresh" not in text

    history = pd.read_csv(run_dir / "history.csv")
    assert history["iteration"].tolist() == list(range(ITERATIONS))  # each iteration exactly once
    updates = cfg["updates_per_iteration"]
    assert history["optimizer_steps"].tolist() == [updates * (i + 1) for i in range(ITERATIONS)]  # never reset
    log = pd.read_parquet(run_dir / "samples_log.parquet")
    assert log.groupby("iteration").size().to_dict() == {i: samples for i in range(ITERATIONS)}
    assert log.groupby("iteration")["optimizer_steps"].first().tolist() == history["optimizer_steps"].tolist()

    # the final buffer: what the checkpoints held, plus later iterations, each trajectory once
    final_ids = _buffer_ids(state_dir / f"iter_{ITERATIONS - 1}" / "buffer.pt", repo)
    assert len(final_ids) == len(set(final_ids)), "a trajectory was stored twice"
    for name, ids in checkpointed.items():
        assert set(ids) <= set(final_ids), f"entries of {name} were lost on resume"
    rollout_ids = {i: set(pd.read_parquet(state_dir / "rollouts" / f"iter_{i}.parquet")["trajectory_id"])
                   for i in range(ITERATIONS)}
    for i, ids in rollout_ids.items():
        assert len(ids) == samples
        assert all(f"/i{i}/" in trajectory_id for trajectory_id in ids)
    assert set(final_ids) <= set().union(*rollout_ids.values())
    assert len(final_ids) == int(history["gate_stored"].sum())  # everything gated in, nothing evicted
    assert (history["gate_stored"] + history["gate_dropped_pruned"] == samples).all()

    # the same as a run that was never interrupted: same samples, same buffer, same training numbers
    _finish(uninterrupted, reference / "run.log")
    reference_dir = reference / "data/runs" / RUN
    pd.testing.assert_frame_equal(log, pd.read_parquet(reference_dir / "samples_log.parquet"))
    assert final_ids == _buffer_ids(reference_dir / f"state/iter_{ITERATIONS - 1}/buffer.pt", reference)
    expected = pd.read_csv(reference_dir / "history.csv")
    timings = [c for c in history.columns if c.endswith("_per_s")]
    pd.testing.assert_frame_equal(history.drop(columns=timings), expected.drop(columns=timings), rtol=1e-5)

    # 3. a configuration change starts afresh: the old state is discarded, iteration 0 runs again
    _write_config(repo, lr=0.002)
    third = _start(repo, env, repo / "third.log")
    fingerprint = (state_dir / "fingerprint").read_text()
    _kill_when(third, repo / "third.log", lambda: (state_dir / "fingerprint").is_file()
               and (state_dir / "fingerprint").read_text() != fingerprint)
    assert "configuration or code changed since the saved state; starting afresh" in (repo / "third.log").read_text()
    assert not list(state_dir.glob("iter_*")), "checkpoints of the old configuration survived"


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch, config, tiny_model_dir):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    import torch

    from cosmocore.policy.models import load_policy
    from cosmocore.rl.trainer import build_learner, load_checkpoint, save_checkpoint
    from cosmocore.rl.run import latest_checkpoint

    model, tokenizer = load_policy(tiny_model_dir, config.model)
    learner = build_learner(model, config.train, tokenizer.pad_token_id, 1.0)
    learner.steps = 7
    save_checkpoint(learner, tmp_path / "iter_0", {"loop": {"iteration": 1}})
    saved = {k: v.clone() for k, v in learner.model.state_dict().items() if "lora" in k}

    with torch.no_grad():
        for name, param in learner.model.named_parameters():
            if "lora" in name:
                param.add_(1.0)
    learner.steps = 8

    class Killed(BaseException):
        pass

    def die(folder):  # the process dies while the checkpoint is half-written
        assert (folder / "trainer_state.pt").is_file()
        raise Killed

    with pytest.raises(Killed):
        save_checkpoint(learner, tmp_path / "iter_1", {"loop": {"iteration": 2}}, also=die)
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0"  # the torn save is invisible

    fresh_model, _ = load_policy(tiny_model_dir, config.model)
    fresh = build_learner(fresh_model, config.train, tokenizer.pad_token_id, 1.0)
    extra = load_checkpoint(fresh, tmp_path / "iter_0")
    assert extra == {"loop": {"iteration": 1}} and fresh.steps == 7
    restored = {k: v for k, v in fresh.model.state_dict().items() if "lora" in k}
    assert saved.keys() == restored.keys() and saved
    for key, value in saved.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=0)

    save_checkpoint(learner, tmp_path / "iter_1", {"loop": {"iteration": 2}})  # the retry replaces the torn save
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_1" and not list(tmp_path.glob(".*.tmp"))


def test_the_fingerprint_covers_the_training_code(tmp_path, monkeypatch):
    """DVC re-runs training when its code changes; the run must then start afresh, not resume the state
    the old code finished (which would train nothing and keep the old results). Every file of the
    package counts, in every subpackage, and the inputs the flow names (config, tasks, model, itself)."""
    from cosmocore.rl import run

    assert run.CODE == Path(run.__file__).parents[1] and (run.CODE / "rl" / "loop.py").is_file()
    package = tmp_path / "package"
    (package / "rl").mkdir(parents=True)
    (package / "rl" / "loop.py").write_text("STEP = 1\n")
    (package / "rl" / "__pycache__").mkdir()
    (tmp_path / "train.json").write_text("{}")
    monkeypatch.setattr(run, "CODE", package)

    def fingerprint() -> str:
        return run.fingerprint("cosmocore", 0, [tmp_path / "train.json"])

    before = fingerprint()
    (package / "rl" / "__pycache__" / "loop.cpython-311.pyc").write_bytes(b"cache")
    assert fingerprint() == before  # unchanged code: a killed run resumes
    (package / "rl" / "loop.py").write_text("STEP = 2\n")
    changed = fingerprint()
    assert changed != before
    (tmp_path / "train.json").write_text('{"lr": 1}')
    assert fingerprint() != changed
