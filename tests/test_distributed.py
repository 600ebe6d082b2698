"""Data parallelism (`cosmocore.rl.distributed`) with two CPU processes talking through gloo, started by
torchrun as they would be on GPUs (NCCL), where no GPU is at hand.

- The loop's own steps (`tests/dist_scenario.py`: rollouts sharded and gathered, tag, gate, nocturnal
  train): the two processes end with identical weights, gradients, buffers and metrics, and these equal
  what one process makes of the same rollouts, within float tolerance, because the two processes' summed
  gradients are one process's gradient on the whole minibatch.
- The training stage with `train.processes: 2` (`python -m flows train`, which starts itself again as two
  processes): one Prefect flow run and one MLflow run per start, outputs written once, and a run killed
  after its first checkpoint resumes on both processes from it, losing and repeating nothing.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests import dist_scenario
from tests.conftest import outer_timeout
from tests.test_buffer import assert_same_future

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m "not slow"` skips them

SCENARIO = Path(dist_scenario.__file__)


def _launch(command: list[str], timeout: int, **popen) -> str:
    """Run `command` in a session of its own, killed whole (every process it started) if it overruns."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, **popen)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, f"{' '.join(command)} failed ({process.returncode}):\n{output[-5000:]}"
    return output


@pytest.fixture(scope="module")
def scenario_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The scenario run by two processes (in two/), then by this one (in one/, on one thread, as each of
    the two uses)."""
    out = tmp_path_factory.mktemp("scenario")
    with outer_timeout(300, "the two-process scenario did not finish in 5 minutes"):
        _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCENARIO),
                 str(out / "two"), str(tiny_model_dir)], timeout=240)
    threads = torch.get_num_threads()
    try:
        dist_scenario.run(out / "one", tiny_model_dir)
    finally:
        torch.set_num_threads(threads)
    return out


def _ended_with(folder: Path, rank: int) -> tuple[dict, object]:
    """What process `rank` of a scenario run wrote: its results, and its buffer (loaded afresh: tests use it up)."""
    from cosmocore.rl.buffer import ReplayBuffer

    buffer = ReplayBuffer.load(folder / f"buffer{rank}.pt", dist_scenario.scenario_config().buffer)
    return torch.load(folder / f"rank{rank}.pt", weights_only=False), buffer


def test_two_processes_end_with_identical_weights_and_buffers(scenario_dir):
    (first, first_buffer), (second, second_buffer) = (_ended_with(scenario_dir / "two", rank) for rank in range(2))
    assert first["world"] == second["world"] == 2
    for key in ("initial", "weights", "grads"):
        assert all(torch.equal(a, b) for a, b in zip(first[key], second[key], strict=True)), key
    assert first["phases"] == second["phases"] and first["expected"] == second["expected"]
    assert first["steps"] == second["steps"] == dist_scenario.ITERATIONS * 2
    assert_same_future(first_buffer, second_buffer)  # same entries, priorities and random state


def test_two_processes_take_the_step_one_takes_on_the_whole_minibatch(scenario_dir):
    (one, one_buffer), (two, two_buffer) = _ended_with(scenario_dir / "one", 0), _ended_with(scenario_dir / "two", 0)
    assert one["world"] == 1
    for a, b in zip(one["initial"], two["initial"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # gradients (left unclipped) show their scale, which Adam's steps would hide
    for a, b in zip(one["grads"], two["grads"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    moved = max(float((w - w0).abs().max()) for w, w0 in zip(one["weights"], one["initial"]))
    apart = max(float((a - b).abs().max()) for a, b in zip(one["weights"], two["weights"]))
    assert moved > 0.01 and apart < 0.01 * moved, (moved, apart)
    assert one["tokens"] == two["tokens"] and one["steps"] == two["steps"]
    for a, b in zip(one["phases"], two["phases"], strict=True):
        assert a.keys() == b.keys()
        assert {k: b[k] for k in a} == pytest.approx(a, rel=1e-4, abs=1e-6, nan_ok=True)
    assert one["expected"] == pytest.approx(two["expected"], rel=1e-6)

    ids = [entry["trajectory_id"] for entry in one_buffer.entries()]
    assert ids == [entry["trajectory_id"] for entry in two_buffer.entries()] and len(set(ids)) == len(ids)
    slots = np.arange(len(one_buffer))
    np.testing.assert_allclose(two_buffer.tree[slots], one_buffer.tree[slots], rtol=1e-4, atol=1e-6)  # priorities
    assert one_buffer.rng.bit_generator.state == two_buffer.rng.bit_generator.state  # the same draws, as many


def test_the_training_stage_on_two_processes_writes_once_and_resumes(tmp_path, tiny_model_dir):
    from tests.test_resume import ITERATIONS, RUN, _buffer_ids, _finish, _kill_when, _start, make_scratch

    n_tasks = 3  # shards of 2 and 1 tasks
    repo, env = make_scratch(tmp_path, tiny_model_dir, n_tasks=n_tasks, processes=2)
    run_dir = repo / "data/runs" / RUN
    state_dir = run_dir / "state"
    stage = ("-m", "flows", "train")  # what dvc.yaml runs: it starts itself again as two processes
    with outer_timeout(420, "the two-process training stage did not finish in 7 minutes"):
        first = _start(repo, env, repo / "first.log", stage)
        _kill_when(first, repo / "first.log", lambda: (state_dir / "iter_0").is_dir())  # the whole group
        checkpointed = _buffer_ids(state_dir / "iter_0" / "buffer.pt", repo)
        text = _finish(_start(repo, env, repo / "second.log", stage), repo / "second.log")
    assert "Setting OMP_NUM_THREADS" in text, "torchrun did not start the processes"
    assert text.count(f"{RUN}: resuming after iteration 0 from") == 1, text[-5000:]  # said once, by the main process

    # outputs written once, as one process would have written them
    history = pd.read_csv(run_dir / "history.csv")
    assert history["iteration"].tolist() == list(range(ITERATIONS))
    updates = int(history["updates"].iloc[0])
    assert history["optimizer_steps"].tolist() == [updates * (i + 1) for i in range(ITERATIONS)]
    samples = n_tasks * 2  # the smoke profile's samples per task
    log = pd.read_parquet(run_dir / "samples_log.parquet")
    assert log.groupby("iteration").size().to_dict() == {i: samples for i in range(ITERATIONS)}
    tasks = {task_id for task_id in pd.read_json(repo / "data/prepared/train.jsonl", lines=True)["task_id"]}
    for i in range(ITERATIONS):  # every task sampled, each by one process, all gathered
        rollouts = pd.read_parquet(state_dir / "rollouts" / f"iter_{i}.parquet")
        assert set(rollouts["task_id"]) == tasks and rollouts["trajectory_id"].is_unique and len(rollouts) == samples
    final_ids = _buffer_ids(state_dir / f"iter_{ITERATIONS - 1}" / "buffer.pt", repo)
    assert len(final_ids) == len(set(final_ids)) and set(checkpointed) <= set(final_ids)
    assert (run_dir / "policy" / "adapter_model.safetensors").is_file() and (run_dir / "train_metrics.json").is_file()
    assert not list(state_dir.glob("*.tmp"))

    # one Prefect flow run per start, every task run inside it; the resumed one ran iteration 1 alone
    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        flow_runs = [row[0] for row in db.execute("select id from flow_run order by created")]
        task_runs = db.execute("select flow_run_id, name from task_run").fetchall()
    assert len(flow_runs) == 2 and all(flow_run in flow_runs for flow_run, _ in task_runs)
    assert sum(flow_run == flow_runs[1] and name.startswith("nocturnal") for flow_run, name in task_runs) == 1

    # one MLflow run per start, which says how many processes trained
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["cosmocore"], filter_string="tags.`cosmocore.stage` = 'train'")
    assert len(runs) == 2 and (runs["params.processes"] == "2").all()


def test_more_gpu_processes_than_gpus_are_refused_before_launch(monkeypatch, config):
    """Two processes cannot share a GPU under NCCL: the stage says what to change instead of starting them."""
    import flows.train as train
    from cosmocore.errors import CosmoCoreError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CosmoCoreError, match="train.processes is 2 but this machine has 1 GPU"):
        train._relaunch("cosmocore", 0, 2, config.model.model_copy(update={"device": "auto"}))
