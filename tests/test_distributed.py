"""Data parallelism (`cosmocore.distributed`) with two CPU processes talking through gloo, started by
torchrun as they would be on GPUs (NCCL), where no GPU is at hand.

- The loop's own steps (`tests/dist_scenario.py`: rollouts sharded and gathered, tag, gate, nocturnal
  train): the two processes end with identical weights, gradients, buffers and metrics, and these equal
  what one process makes of the same rollouts, within float tolerance, because the two processes' summed
  gradients are one process's gradient on the whole minibatch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import dist_scenario
from tests.conftest import outer_timeout
from tests.test_buffer import assert_same_future

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
    from cosmocore.buffer import ReplayBuffer

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

