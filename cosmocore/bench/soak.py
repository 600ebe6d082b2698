"""Soak the sandbox: four times as many concurrent samples as cores, for minutes, mixing passes,
failures, timeouts, crashes, memory and tmpfs exhaustion, leftover children and killed workers.

Every verdict (outcome class and exception type) is compared with the one the same sample gets in a
calm run (one worker, one sample at a time); after the sandbox closes, no process it started (jailed
workers, the samples and their children) and no scratch file may be left.

    python -m cosmocore.bench.soak --minutes 10        (or: cosmocore bench soak --minutes 10)

The last line is `RESULT soak minutes=M executions=N executions_per_s=X mismatches=0 leaked_processes=0
leaked_files=0`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cosmocore.config import DASK_ADDRESS_ENV, SandboxConfig, load_params
from cosmocore.sandbox.runner import ExecRequest, Sandbox

CHECK = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"
UNITTEST = ("import unittest\nclass T(unittest.TestCase):\n    def test_one(self):\n"
            "        self.assertEqual(add_one(1), 2)\n")
FILL_TMPFS = """
import os
def add_one(x):
    chunk = b'0' * (1 << 20)
    for n in range(100_000):
        for folder in ('/tmp', '/dev/shm'):
            with open(os.path.join(folder, f'fill{n}'), 'wb') as handle:
                handle.write(chunk * 4)
"""
# name: (program, test, weight in the mix); every test calls add_one.
SAMPLES: dict[str, tuple[str, str, int]] = {
    "pass": ("def add_one(x):\n    return x + 1\n", CHECK, 6),
    "pass_unittest": ("def add_one(x):\n    return x + 1\n", UNITTEST, 2),
    "wrong_answer": ("def add_one(x):\n    return x + 2\n", CHECK, 4),
    "syntax_error": ("def add_one(x)\n    return x\n", CHECK, 2),
    "runtime_error": ("def add_one(x):\n    return x / 0\n", CHECK, 2),
    "no_code": ("  \n", CHECK, 1),
    "cpu_loop": ("def add_one(x):\n    while True:\n        pass\n", CHECK, 1),
    "sleep": ("import time\ndef add_one(x):\n    time.sleep(10 ** 6)\n", CHECK, 1),
    "memory_bomb": ("def add_one(x):\n    return len(bytearray(4 << 30))\n", CHECK, 1),
    "segfault": ("import faulthandler\ndef add_one(x):\n    faulthandler._sigsegv()\n", CHECK, 1),
    "early_exit": ("import os\ndef add_one(x):\n    os._exit(0)\n", CHECK, 1),
    "leftover_children": ("import subprocess\nsubprocess.Popen(['sleep', '300'])\n"
                          "def add_one(x):\n    return x + 1\n", CHECK, 1),
    "fill_tmpfs": (FILL_TMPFS, CHECK, 1),
    "kill_worker": ("import os, signal\ndef add_one(x):\n    os.kill(-1, signal.SIGKILL)\n", CHECK, 1),
}


def soak_config(base: SandboxConfig, cores: int) -> SandboxConfig:
    """Four jailed workers per core; a CPU limit a loaded core still reaches well inside the wall cap,
    and a small tmpfs so that filling it is quick."""
    return base.model_copy(update={"workers": 4 * cores, "cpu_seconds": 1.0, "wall_seconds": 10.0,
                                   "tmpfs_mb": 32, "preload_modules": [], "dask_address": ""})


def request(name: str, number: int = 0) -> ExecRequest:
    program, test, _ = SAMPLES[name]
    return ExecRequest(f"{name}/{number}", program, test, "add_one", "unittest" if "TestCase" in test else "humaneval")


def verdict(result) -> tuple[str, str]:
    return result.outcome, result.exception_type


def calm_verdicts(config: SandboxConfig) -> dict[str, tuple[str, str]]:
    """Each sample's verdict on one worker, one sample at a time."""
    with Sandbox(config.model_copy(update={"workers": 1})) as sandbox:
        return {name: verdict(sandbox.run([request(name)])[0]) for name in SAMPLES}


# ------------------------------------------------------------------------------ what was started


def process_table() -> dict[int, tuple[int, str]]:
    """pid: (parent pid, start time) of every process now alive (a zombie is dead: only its parent, or
    init when that is gone too, has yet to collect its exit status)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if fields[0] != "Z":
                table[int(entry)] = (int(fields[1]), fields[19])
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, frontier = [], [root]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def is_namespace_init(pid: int) -> bool:
    """Whether `pid` is process 1 of its own pid namespace (a jail's init)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return any(line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2
               for line in status.splitlines())


class Census:
    """Notes, every `period` seconds, each process this one started since the census began (with its start
    time, so a reused pid is not mistaken for it; children it had before, such as a multiprocessing
    resource tracker, are not the sandbox's), the pid namespaces of the jails among them (by their init: a dead
    namespace's number is soon given to someone else's) and the host scratch folders workers were
    given; `leaks()` then counts what outlived the sandbox."""

    def __init__(self, period: float = 0.5):
        self.period, self.own_namespace = period, pid_namespace(os.getpid())
        table = process_table()
        self.before = {(pid, table[pid][1]) for pid in descendants(os.getpid(), table)}
        self.seen: set[tuple[int, str]] = set()
        self.namespaces: dict[str, tuple[int, str]] = {}  # namespace: its init (pid, start time)
        self.scratch: set[str] = set()
        self.shm_before = set(os.listdir("/dev/shm"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="soak-census", daemon=True)

    def __enter__(self) -> Census:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def note(self) -> None:
        table = process_table()
        for pid in descendants(os.getpid(), table):
            if (pid, table[pid][1]) in self.before:
                continue
            self.seen.add((pid, table[pid][1]))
            namespace = pid_namespace(pid)
            if namespace and namespace != self.own_namespace and is_namespace_init(pid):
                self.namespaces[namespace] = (pid, table[pid][1])
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                scratch = json.loads(argv[-2])["scratch"] if argv[-2].startswith(b"{") else None
            except (OSError, IndexError, ValueError, KeyError):
                continue
            if scratch and scratch != "/tmp":  # "/tmp" is the jail's own, gone with it
                self.scratch.add(scratch)

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            self.note()

    def leaks(self, settle: float = 2.0) -> tuple[list[int], list[str]]:
        """(processes still alive that were seen, or that live in a jail whose init is still alive; scratch
        files left on the host: in the workers' scratch folders and new in /dev/shm). A jail killed a
        moment ago may still be exiting: its processes get `settle` seconds to go."""
        deadline = time.monotonic() + settle
        while (alive := self._alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        files = [str(path) for folder in self.scratch if os.path.exists(folder)
                 for path in [Path(folder), *Path(folder).rglob("*")]]
        files += [f"/dev/shm/{name}" for name in set(os.listdir("/dev/shm")) - self.shm_before
                  if os.stat(f"/dev/shm/{name}").st_uid != os.getuid()]
        return alive, files

    def _alive(self) -> list[int]:
        table = process_table()
        live_jails = {namespace for namespace, (pid, started) in self.namespaces.items()
                      if table.get(pid, (0, ""))[1] == started}
        return [pid for pid, (_, started) in table.items()
                if (pid, started) in self.seen or pid_namespace(pid) in live_jails]


# ----------------------------------------------------------------------------------------- the soak


def soak(config: SandboxConfig, seconds: float, log=print) -> dict:
    """Run the mix for `seconds` on 4 × cores concurrent workers; compare with the calm verdicts and
    count what was left behind after close."""
    cores = os.cpu_count() or 1
    config = soak_config(config, cores)
    calm = calm_verdicts(config)
    log(f"calm verdicts: {json.dumps(calm)}")
    mix = [name for name, (_, _, weight) in SAMPLES.items() for _ in range(weight)]
    numbers, lock = itertools.count(), threading.Lock()
    counts: Counter[str] = Counter()
    mismatches: list[tuple[str, tuple[str, str]]] = []
    started = time.monotonic()
    deadline = started + seconds

    def keep_busy(sandbox: Sandbox) -> None:
        while time.monotonic() < deadline:
            with lock:
                number = next(numbers)
            name = mix[(number * 7) % len(mix)]  # 7 is prime to the mix's length: every kind in turn
            result = sandbox.run([request(name, number)])[0]
            with lock:
                counts[name] += 1
                if verdict(result) != calm[name]:
                    mismatches.append((result.task_id, verdict(result)))

    with Census() as census:
        with Sandbox(config) as sandbox, ThreadPoolExecutor(config.workers) as pool:
            for future in [pool.submit(keep_busy, sandbox) for _ in range(config.workers)]:
                future.result()
            census.note()
        elapsed = time.monotonic() - started
    processes, files = census.leaks()
    executions = sum(counts.values())
    log(f"{executions} executions in {elapsed:.0f} s on {config.workers} workers ({cores} cores): {dict(counts)}")
    for task_id, got in mismatches[:20]:
        log(f"mismatch: {task_id} got {got}, calm run {calm[task_id.split('/')[0]]}")
    for pid in processes[:20]:
        with contextlib.suppress(OSError):  # unless it is gone meanwhile
            log(f"leaked process {pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r}")
    for path in files[:20]:
        log(f"leaked file {path}")
    return {"executions": executions, "seconds": elapsed, "mismatches": len(mismatches),
            "leaked_processes": len(processes), "leaked_files": len(files), "counts": dict(counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to soak (default: 10)")
    args = parser.parse_args()
    os.environ.pop(DASK_ADDRESS_ENV, None)  # this machine's pools are what is soaked
    summary = soak(load_params().sandbox, 60 * args.minutes)
    print(f"RESULT soak minutes={args.minutes:g} executions={summary['executions']} "
          f"executions_per_s={summary['executions'] / summary['seconds']:.1f} mismatches={summary['mismatches']} "
          f"leaked_processes={summary['leaked_processes']} leaked_files={summary['leaked_files']}")


if __name__ == "__main__":
    main()
