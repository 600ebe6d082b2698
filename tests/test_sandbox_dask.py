"""The sandbox on a Dask cluster: a real local cluster of two worker processes gives the verdicts the
local pools give, sample by sample, and leaves no process behind; the address's precedence and the
error an unreachable scheduler raises."""

from __future__ import annotations

import time
from multiprocessing import resource_tracker

import psutil
import pytest
from distributed import LocalCluster

from cosmocore.bench.sandbox import requests_of, samples
from cosmocore.config import DASK_ADDRESS_ENV, load_params
from cosmocore.sandbox.runner import Sandbox, SandboxError
from tests.conftest import REPO, outer_timeout

UNREACHABLE = "tcp://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture(scope="module")
def config():
    return load_params(REPO / "params.yaml").sandbox.model_copy(update={"workers": 2})


def verdicts(results) -> list[tuple]:
    return [(r.task_id, r.outcome, r.passed, r.hallucinated, r.hallucination_static, r.hallucination_runtime,
             r.exception_type) for r in results]


@pytest.mark.slow
def test_dask_cluster_gives_the_local_verdicts_and_leaves_nothing_running(config, monkeypatch):
    """Every HumanEval canonical solution and a broken variant of each (the sandbox bench's samples, 328),
    and a trace: 16-30 s on 2 busy cores."""
    monkeypatch.delenv(DASK_ADDRESS_ENV, raising=False)
    requests = requests_of(samples())
    program, call = "def f(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n", "f([1, 2])"
    resource_tracker.ensure_running()  # multiprocessing's, which lives as long as this process: not a leak
    before = set(psutil.Process().children(recursive=True))
    with outer_timeout(180, "the Dask sandbox test ran past 180 s"):
        with Sandbox(config) as local:
            expected, expected_trace = verdicts(local.run(requests)), local.trace(program, call)
        with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
            with Sandbox(config.model_copy(update={"dask_address": cluster.scheduler_address})) as remote:
                assert (remote.size, remote.isolation) == (2, "bwrap")
                got, got_trace = verdicts(remote.run(requests)), remote.trace(program, call)
                started = set(psutil.Process().children(recursive=True)) - before
                jailed = [p for p in started if p.name() == "bwrap"]
    assert got == expected
    facts = ("passed", 3, {"x": 2, "total": 3}, [2, 3, 4, 3, 4, 3, 5])
    assert [(t.outcome, t.output, t.variables, t.lines) for t in (got_trace, expected_trace)] == [facts] * 2
    assert len(jailed) >= 4  # two Dask workers, a light jailed worker each (bwrap and its pid-1 child)
    _, alive = psutil.wait_procs(started, timeout=15)
    assert not alive, f"left running after the cluster closed: {[p.cmdline() for p in alive]}"


def test_the_environment_variable_wins_even_when_empty(config, monkeypatch):
    monkeypatch.setenv(DASK_ADDRESS_ENV, "")
    with Sandbox(config.model_copy(update={"dask_address": UNREACHABLE})) as sandbox:
        assert sandbox.run(requests_of(samples()[:1]))[0].passed


def test_an_unreachable_scheduler_fails_fast_naming_the_fix(config, monkeypatch):
    monkeypatch.setenv(DASK_ADDRESS_ENV, UNREACHABLE)
    start = time.monotonic()
    with outer_timeout(60, "connecting to an unreachable scheduler did not give up"):
        with pytest.raises(SandboxError, match=r"dask scheduler.*dask worker tcp://127\.0\.0\.1:9.*COSMOCORE_DASK_ADDRESS"):
            Sandbox(config)
    assert time.monotonic() - start < 30
