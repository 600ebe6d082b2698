"""The sandbox under stress: a worker killed from outside mid-sample, samples that sleep past the wall
clock without using CPU, a sample that fills its tmpfs, and a one-minute soak (`cosmocore bench soak`).

What tests/test_sandbox.py already covers is not repeated here: a sample that kills its own worker
(`os.kill(-1, ...)`), `time.sleep` past the wall cap, litter in /tmp and /dev/shm between samples, fork
bombs and leftover children. A SIGALRM guard turns a hang into a failure.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from cosmocore.bench.soak import Census, descendants, process_table, soak
from cosmocore.config import load_params
from cosmocore.sandbox.pools import HOST_GRACE_SECONDS
from cosmocore.sandbox.runner import ExecRequest, Sandbox
from tests.conftest import outer_timeout

GUARD_SECONDS = 60
ADD_ONE = "def add_one(x):\n    return x + 1\n"
CHECK = "def check(candidate):\n    assert candidate(1) == 2\n"


@pytest.fixture
def config():
    return load_params("params.yaml").sandbox.model_copy(
        update={"cpu_seconds": 1.0, "wall_seconds": 3.0, "workers": 1, "memory_mb": 1024, "tmpfs_mb": 16,
                "preload_modules": [], "dask_address": ""})


@pytest.fixture(autouse=True)
def guard():
    with outer_timeout(GUARD_SECONDS, f"test exceeded {GUARD_SECONDS} s: the sandbox hung"):
        yield


def run(sandbox: Sandbox, program: str) -> object:
    return sandbox.run([ExecRequest("t/0", program, CHECK, "add_one", "humaneval")])[0]


def calm_run_verdicts(sandbox: Sandbox) -> list[tuple[str, str]]:
    programs = [ADD_ONE, "def add_one(x):\n    return x\n", "def add_one(x):\n    return 1 / 0\n"]
    return [(r.outcome, r.exception_type) for r in (run(sandbox, p) for p in programs)]


CALM = [("passed", ""), ("wrong_answer", "AssertionError"), ("runtime_error", "ZeroDivisionError")]


def program(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0]
    except OSError:  # gone meanwhile
        return b"bwrap"


def worker_processes() -> tuple[dict[int, str], int, int]:
    """(start time of each process of the only worker: bubblewrap's, the jailed server and the child it
    forked for the next sample; the server's pid; that child's pid)."""
    deadline = time.monotonic() + 10
    while True:
        table = process_table()
        # rooted at bubblewrap: other children of this process (a multiprocessing resource tracker left by an
        # earlier test in the session, say) are not the worker's
        jails = [pid for pid in descendants(os.getpid(), table) if program(pid).endswith(b"bwrap")]
        ours = {pid: table[pid][1] for jail in jails for pid in [jail, *descendants(jail, table)]}
        python = [pid for pid in ours if pid not in jails and not program(pid).endswith(b"bwrap")]
        if len(python) == 2 or time.monotonic() > deadline:  # the child is forked just after a reply
            server = next(pid for pid in python if table[pid][0] not in python)
            return ours, server, next(pid for pid in python if pid != server)
        time.sleep(0.05)


def gone(processes: dict[int, str]) -> bool:
    now = process_table()
    return not [pid for pid, started in processes.items() if now.get(pid, (0, ""))[1] == started]


def test_a_worker_killed_from_outside_mid_sample_is_replaced(config):
    """SIGKILL to the jailed server's pid (as the OOM killer would) while it runs a sample: that sample
    gets the lost-worker verdict, the next ones the calm run's, and nothing of the old worker lives on."""
    with Census() as census, Sandbox(config) as sandbox:
        assert run(sandbox, ADD_ONE).passed  # the worker is up
        old, server, _ = worker_processes()
        threading.Timer(1.0, os.kill, (server, signal.SIGKILL)).start()
        result = run(sandbox, "import time\ndef add_one(x):\n    time.sleep(30)\n")
        assert (result.outcome, result.exception_type) == ("sandbox_violation", "WorkerKilled")
        assert result.wall_s == 0.0 and "restarted" in result.stderr
        assert calm_run_verdicts(sandbox) == CALM
        assert gone(old)
    assert census.leaks() == ([], [])


@pytest.mark.parametrize("victim", ["server", "waiting child"])
def test_a_worker_killed_from_outside_while_idle_does_not_fail_the_next_sample(config, victim):
    """Killed between samples, the server is restarted, or the child it forked ahead re-forked, before
    the next sample: that sample is not blamed for it (it was: WorkerKilled, or Crash:SIGKILL)."""
    with Census() as census, Sandbox(config) as sandbox:
        assert run(sandbox, ADD_ONE).passed
        old, server, child = worker_processes()
        os.kill(server if victim == "server" else child, signal.SIGKILL)
        time.sleep(0.5)
        assert calm_run_verdicts(sandbox) == CALM
        if victim == "server":
            assert gone(old)
    assert census.leaks() == ([], [])


@pytest.mark.parametrize("idle", [
    "threading.Event().wait()",
    "select.select([], [], [])",
    "signal.pause()",
    "os.read(os.pipe()[0], 1)",
])
def test_sleeping_without_cpu_hits_the_wall_cap(config, idle):
    """Blocked without using CPU, so RLIMIT_CPU never fires: the wall cap ends it, on time."""
    program = f"import os, select, signal, threading\ndef add_one(x):\n    {idle}\n"
    with Sandbox(config) as sandbox:
        assert run(sandbox, ADD_ONE).passed  # the worker is up: start-up is not timed
        started = time.monotonic()
        result = run(sandbox, program)
        elapsed = time.monotonic() - started
        assert (result.outcome, result.exception_type) == ("timeout", "WallTimeLimit")
        assert config.wall_seconds <= elapsed < config.wall_seconds + HOST_GRACE_SECONDS
        assert calm_run_verdicts(sandbox) == CALM


def test_filling_the_tmpfs_is_a_clear_verdict_and_the_next_sample_starts_empty(config):
    """Writing to /tmp and /dev/shm until ENOSPC ends in an OSError naming the full device; the next
    sample, on the same (only) worker, finds both empty."""
    fill = """
import errno, os
def add_one(x):
    for folder in ('/tmp', '/dev/shm'):
        n = 0
        try:
            while True:
                with open(os.path.join(folder, f'fill{n}'), 'wb') as handle:
                    handle.write(b'0' * (4 << 20))
                n += 1
        except OSError as error:
            if error.errno != errno.ENOSPC or folder == '/dev/shm':
                raise
"""
    look = """
import os
def add_one(x):
    left = [n for n in os.listdir('/tmp') if n != 'sample'] + os.listdir('/dev/shm') + os.listdir('.')
    return x + 1 if not left else left
"""
    with Sandbox(config) as sandbox:
        result = run(sandbox, fill)
        assert (result.outcome, result.exception_type) == ("runtime_error", "OSError")
        assert "No space left on device" in result.stderr
        for _ in range(2):
            assert run(sandbox, look).passed
        assert calm_run_verdicts(sandbox) == CALM


@pytest.mark.slow
def test_soak_one_minute():
    """`cosmocore bench soak --minutes 1`: every verdict as in the calm run, nothing left behind."""
    lines: list[str] = []
    with outer_timeout(240, "the one-minute soak did not finish in 4 minutes"):
        summary = soak(load_params("params.yaml").sandbox, 60, log=lines.append)
    assert summary["executions"] > 100
    assert set(summary["counts"]) == {"pass", "pass_unittest", "wrong_answer", "syntax_error", "runtime_error",
                                      "no_code", "cpu_loop", "sleep", "memory_bomb", "segfault", "early_exit",
                                      "leftover_children", "fill_tmpfs", "kill_worker"}
    assert (summary["mismatches"], summary["leaked_processes"], summary["leaked_files"]) == (0, 0, 0), lines
