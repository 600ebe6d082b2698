"""This machine's pools of the sandbox: run untrusted, model-written programs against their tests,
isolated and fast.

Layout of an execution:

    LocalPools.run ──threads──► _Worker (one per core) ══ pipe ══► jail: worker.py server
                                                                  └─ fork per sample: rlimits,
                                                                     private folder, harness

Each worker is one long-lived server, jailed once when it starts (bubblewrap: no network, its own
pid namespace, a read-only system, a private /tmp, no environment, its own unprivileged uid so that
RLIMIT_NPROC binds), which forks a fresh child per sample. The jail is paid once per worker, the
sample pays a fork. There are two pools of workers (one per core each, started on first use):
one imports only the standard library, the other also `sandbox.preload_modules` (numpy, pandas),
and a sample goes to the second only when its program or tests import beyond the standard library,
because forking a server that holds pandas costs several times more than forking a light one. `worker.py` reports raw facts; this module classifies them into the
outcome classes of docs/design.md and adds the static half of the hallucination flag.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cosmocore.config import SandboxConfig
from cosmocore.data.records import OUTCOMES
from cosmocore.errors import CosmoCoreError
from cosmocore.sandbox.static_check import static_hallucinations

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("worker.py")
# Under bubblewrap the worker script is shown at a fixed place on a private /run (which also hides the
# host's sockets), so a checkout anywhere, /tmp included, works.
JAIL_WORKER_DIR = "/run/cosmocore"
FIRST_WORKER_UID = 60000  # worker i runs as uid/gid FIRST_WORKER_UID + i: its own RLIMIT_NPROC count
STARTUP_SECONDS = 60.0
HOST_GRACE_SECONDS = 10.0  # on top of the wall cap, before the host gives up on a silent worker
STOP_SECONDS = 5.0  # how long closing the pools waits for an idle worker to exit before killing it
JAIL_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",  # set and dict orders, hence traces, are the same on every run
    "PYTHONDONTWRITEBYTECODE": "1",
    "OPENBLAS_NUM_THREADS": "1",  # one sample, one core: no false timeouts from a neighbour's threads
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}
PRELOAD_STDLIB = ("collections", "itertools", "functools", "math", "re", "string", "heapq", "bisect",
                  "random", "statistics", "fractions", "decimal", "datetime", "typing", "dataclasses",
                  "json", "hashlib", "operator", "copy")
_announced: set[str] = set()


class SandboxError(CosmoCoreError, RuntimeError):
    """The sandbox itself cannot run (not a verdict on a sample): the message says what to fix."""


@dataclass(frozen=True)
class ExecRequest:
    task_id: str
    program: str  # the whole program: prompt + completion (imports, the function(s))
    test: str
    entry_point: str
    test_style: str  # humaneval (defines check(candidate)) | unittest (unittest.TestCase classes)


@dataclass
class ExecResult:
    task_id: str
    outcome: str  # one of records.OUTCOMES
    passed: bool
    hallucinated: bool
    hallucination_evidence: list[str]
    hallucination_static: bool
    hallucination_runtime: bool
    exception_type: str  # "" when none
    failing_test: str  # "" when none
    stderr: str  # the tail, trimmed to cfg.stderr_chars
    test_share: float  # share of tests passed (unittest style); NaN for humaneval style
    cpu_s: float
    wall_s: float

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None (JSON has no NaN)."""
        row = asdict(self)
        row["test_share"] = None if math.isnan(self.test_share) else self.test_share
        return row


@dataclass
class TraceResult:
    """One traced call (CodeRL+). `outcome` is "passed" when the call returned, else the class of
    what stopped it; `variables` holds the last `max_vars` locals the called function assigned,
    least recent first, with their final values; `lines` the line numbers it executed, in order."""

    outcome: str
    output: Any = None
    variables: dict[str, Any] = field(default_factory=dict)
    lines: list[int] = field(default_factory=list)
    exception_type: str = ""
    stderr: str = ""
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------- isolation


def _announce(level: int, message: str) -> None:
    """Say once per process which isolation is in force: never silently weaker."""
    if message not in _announced:
        _announced.add(message)
        log.log(level, message)


def _probe(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _bwrap_namespaces() -> list[str]:
    # As root, bubblewrap must not add a user namespace: the worker then drops to its own uid, which
    # has to be a real uid of the host for RLIMIT_NPROC to bind. Unprivileged, it needs one.
    if os.geteuid() == 0:
        return ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    return ["--unshare-all"]


def _unshare_namespaces() -> list[str]:
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [*user, "--pid", "--net", "--ipc", "--uts", "--mount", "--fork", "--kill-child", "--mount-proc"]


def _available(isolation: str) -> bool:
    if isolation == "bwrap":
        return shutil.which("bwrap") is not None and _probe(
            [shutil.which("bwrap"), *_bwrap_namespaces(), "--ro-bind", "/", "/", "--", "true"])
    if isolation == "unshare":
        return shutil.which("unshare") is not None and _probe([shutil.which("unshare"), *_unshare_namespaces(), "true"])
    return True


def _choose_isolation(requested: str) -> str:
    if requested != "auto":
        if not _available(requested):
            raise SandboxError(
                f"sandbox.isolation is {requested!r} but it does not work here: install it (apt-get install "
                f"{'bubblewrap' if requested == 'bwrap' else 'util-linux'}), allow user namespaces, or set "
                "sandbox.isolation to auto")
        return requested
    return next(mode for mode in ("bwrap", "unshare", "none") if _available(mode))


def _world_traversable(path: Path) -> bool:
    """Whether a uid of no group could reach `path` (every parent folder world-searchable)."""
    path = path.resolve()
    return all(parent.stat().st_mode & 0o001 for parent in [*reversed(path.parents)] if parent != path)


def _interpreter_paths() -> list[Path]:
    """What the jail must show: the interpreter, its standard library and site-packages."""
    import site

    paths = {Path(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages())}
    return sorted(p for p in paths if p.exists())


def _interpreter() -> str:
    """The interpreter the workers run. A virtual environment's by its own path (its pyvenv.cfg, found
    from that path, makes it the environment); any other by the file its path links to, which lies in
    the prefix the jail shows, where the link itself (say /tmp/x/python) may not."""
    return sys.executable if sys.prefix != sys.base_prefix else os.path.realpath(sys.executable)


class _Jail:
    """How workers are started under the isolation in force; built once per Sandbox."""

    def __init__(self, config: SandboxConfig):
        self.config = config
        self.isolation = _choose_isolation(config.isolation)
        readable = all(_world_traversable(p) for p in _interpreter_paths())
        # Under bubblewrap the jail hides home folders and re-shows the interpreter, so any uid
        # can run it; without it, a dedicated uid works only if the interpreter is world-readable.
        self.own_uids = os.geteuid() == 0 and (self.isolation == "bwrap" or readable)
        self._announce()

    def _announce(self) -> None:
        uid = "one unprivileged uid per worker" if self.own_uids else "the caller's uid for every worker"
        if self.isolation == "bwrap":
            _announce(logging.INFO, f"sandbox isolation: bubblewrap (no network, own pid namespace, read-only "
                                    f"system, private /tmp, empty environment), {uid}, rlimits")
        elif self.isolation == "unshare":
            _announce(logging.WARNING, f"sandbox isolation: unshare (no network, own pid namespace) with {uid} "
                                       "and rlimits; the file system is NOT read-only: install bubblewrap")
        else:
            _announce(logging.WARNING, f"sandbox isolation: NONE, rlimits only, {uid}: samples can reach the "
                                       "network and the file system; install bubblewrap (apt-get install bubblewrap)")
        if not self.own_uids and os.geteuid() == 0:
            _announce(logging.WARNING, "sandbox: samples run as root, because the interpreter is not readable by "
                                       "other uids: RLIMIT_NPROC does not bind, so only the time limits stop a fork "
                                       "bomb; make the interpreter world-readable or install bubblewrap")
        elif not self.own_uids:
            _announce(logging.WARNING, "sandbox: workers share your uid and RLIMIT_NPROC counts per uid, so a fork "
                                       "bomb in one sample can starve the samples beside it; run as root for "
                                       "one uid per worker")

    def command(self, index: int, preload: list[str]) -> tuple[list[str], dict[str, str], str | None]:
        """argv and environment of worker `index` (which imports `preload` once), and a host folder
        to delete when it stops."""
        uid = FIRST_WORKER_UID + index if self.own_uids else None
        scratch = "/tmp" if self.isolation == "bwrap" else self._host_scratch(uid)
        settings = {
            "limits": self.config.model_dump(),
            "scratch": scratch,
            "sweep": "all" if self.isolation != "none" or uid is not None else "group",
            # /dev/shm is the samples' own only in the jail or under a uid of their own: elsewhere the
            # worker runs as the caller, and emptying it would delete the caller's shared memory
            "shared_memory": self.isolation == "bwrap" or uid is not None,
            "preload": [*PRELOAD_STDLIB, *preload],
            "uid": uid,
        }
        script = f"{JAIL_WORKER_DIR}/{WORKER_SCRIPT.name}" if self.isolation == "bwrap" else str(WORKER_SCRIPT)
        python = [_interpreter(), "-s", "-P", script, json.dumps(settings)]
        env = {**JAIL_ENV, "HOME": scratch, "TMPDIR": scratch}
        # The isolation tool by the path found on the caller's PATH: the worker's own (`JAIL_ENV`, or
        # none under bwrap) misses one installed in, say, ~/.local/bin or a conda environment.
        if self.isolation == "bwrap":
            return [*self._bwrap_argv(env), *python], {}, None
        if self.isolation == "unshare":
            return [shutil.which("unshare"), *_unshare_namespaces(), *python], env, scratch
        return python, env, scratch

    def _host_scratch(self, uid: int | None) -> str:
        folder = tempfile.mkdtemp(prefix="cosmocore-sandbox-")
        if uid is not None:
            os.chown(folder, uid, uid)
        return folder

    def _bwrap_argv(self, env: dict[str, str]) -> list[str]:
        size = str(self.config.tmpfs_mb << 20)
        argv = [shutil.which("bwrap"), *_bwrap_namespaces(), "--die-with-parent", "--new-session",
                "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
        # Empty folders replace the host's: /tmp and /dev/shm become the samples' bounded scratch,
        # /run loses the host's sockets, and the caller's home and repository (keys, data, checkpoints)
        # and any configured folder vanish. A folder inside another is already hidden by it.
        scratch = ["--perms", "1777", "--size", size]
        blanks = {Path("/tmp"): scratch, Path("/dev/shm"): scratch, Path("/run"): ["--perms", "0755"]}
        hidden = {Path.home().resolve(), WORKER_SCRIPT.resolve().parents[2],  # the repository (or site-packages)
                  *(Path(folder).expanduser().resolve() for folder in self.config.hide_paths)}
        for folder in hidden:
            if folder.is_dir():
                blanks.setdefault(folder, ["--perms", "0755"])
        roots = [folder for folder in sorted(blanks) if not any(other in folder.parents for other in blanks)]
        for root in roots:
            argv += [*blanks[root], "--tmpfs", str(root)]
        argv += _reshown(_interpreter_paths(), roots)
        # The worker script alone, at a fixed place: the checkout it comes from stays hidden.
        argv += ["--perms", "0755", "--dir", JAIL_WORKER_DIR,
                 "--ro-bind", str(WORKER_SCRIPT.resolve()), f"{JAIL_WORKER_DIR}/{WORKER_SCRIPT.name}",
                 "--chdir", "/tmp", "--clearenv"]
        for key, value in env.items():
            argv += ["--setenv", key, value]
        return [*argv, "--"]


def _reshown(paths: list[Path], roots: list[Path]) -> list[str]:
    """bubblewrap arguments that show `paths` again, read-only at their own place, where they lie
    inside one of the emptied folders `roots` (an interpreter in a virtual environment under /tmp or
    the home), and nothing else of the host's folders around them.

    The folders leading to a path are made in a small file system of their own at the top entry below
    its root (bubblewrap would make them 0700, unreachable to the worker's uid), which is then made
    read-only: so every entry the jail puts in the samples' scratch is a mount point, which the worker's
    sweep leaves alone and no sample can write into."""
    argv: list[str] = []
    shown: list[Path] = []
    made: set[Path] = set()
    tops: list[Path] = []
    for path in paths:  # sorted: a folder comes before what it holds
        root = next((root for root in roots if root == path or root in path.parents), None)
        if root is None or any(folder == path or folder in path.parents for folder in shown):
            continue  # not hidden, or inside a folder already shown
        shown.append(path)
        if root in path.parent.parents:  # two levels below its root or deeper
            top = root / path.relative_to(root).parts[0]
            if top not in made:
                made.add(top)
                tops.append(top)
                argv += ["--perms", "0755", "--tmpfs", str(top)]
            for parent in reversed(path.parents):
                if top in parent.parents and parent not in made:
                    made.add(parent)
                    argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", str(path), str(path)]
    for top in tops:
        argv += ["--remount-ro", str(top)]
    return argv


# ------------------------------------------------------------------------------------- workers


class _WorkerLost(Exception):
    """The worker died (killed by its sample, most likely) or stopped answering."""

    def __init__(self, hung: bool, detail: str):
        super().__init__(detail)
        self.hung = hung


class _Spawner:
    """Starts every worker process from one long-lived thread.

    bubblewrap's --die-with-parent (PR_SET_PDEATHSIG) fires when the *thread* that started it
    exits, so a worker started from a pool thread would die with that thread."""

    _lock = threading.Lock()
    _jobs: queue.Queue | None = None

    @classmethod
    def popen(cls, argv: list[str], **options) -> subprocess.Popen:
        with cls._lock:
            if cls._jobs is None:
                cls._jobs = queue.Queue()
                threading.Thread(target=cls._serve, name="cosmocore-sandbox-spawner", daemon=True).start()
        done: Future = Future()
        cls._jobs.put((done, argv, options))
        return done.result()

    @classmethod
    def _serve(cls) -> None:
        while True:
            done, argv, options = cls._jobs.get()
            try:
                done.set_result(subprocess.Popen(argv, **options))
            except OSError as error:
                done.set_exception(error)


class _Worker:
    """One jailed forking server, spoken to in length-prefixed JSON frames over its stdin/stdout."""

    def __init__(self, index: int, jail: _Jail, preload: list[str]):
        self.index, self.jail, self.preload = index, jail, preload
        self.process: subprocess.Popen | None = None
        self.scratch: str | None = None
        self.errors = None  # the worker's stderr, a temporary file read when it fails to start

    def start(self) -> None:
        argv, env, self.scratch = self.jail.command(self.index, self.preload)
        self.errors = tempfile.TemporaryFile()
        self.process = _Spawner.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                      env=env, start_new_session=True, bufsize=0)
        try:
            hello = self._receive(time.monotonic() + STARTUP_SECONDS)
        except _WorkerLost as lost:
            tail = self._error_tail()
            self.stop()
            raise SandboxError(
                f"sandbox worker {self.index} did not start under isolation {self.jail.isolation!r} ({lost}): "
                f"{tail} — set sandbox.isolation to another mode, or fix the cause above") from None
        if not hello.get("ready"):
            self.stop()
            raise SandboxError(f"sandbox worker {self.index} answered {hello!r} instead of ready")

    def call(self, message: dict, timeout: float, meanwhile=None) -> dict:
        if self.process is not None and self.process.poll() is not None:
            self.stop()  # it died while idle (killed from outside): not the next sample's doing
        if self.process is None:
            self.start()
        payload = json.dumps(message).encode()
        try:
            self.process.stdin.write(struct.pack(">I", len(payload)) + payload)
            deadline = time.monotonic() + timeout
            failure = None
            if meanwhile is not None:
                try:
                    meanwhile()
                except Exception as error:  # raised once the reply is read: the protocol stays in step
                    failure = error
            reply = self._receive(deadline)
            if failure is not None:
                raise failure
            return reply
        except (BrokenPipeError, _WorkerLost) as error:
            hung = isinstance(error, _WorkerLost) and error.hung
            self.stop()
            raise _WorkerLost(hung, str(error)) from None

    def _receive(self, deadline: float) -> dict:
        header = self._read_exact(4, deadline)
        return json.loads(self._read_exact(struct.unpack(">I", header)[0], deadline))

    def _read_exact(self, size: int, deadline: float) -> bytes:
        fd = self.process.stdout.fileno()
        data = bytearray()
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _WorkerLost(True, "the worker stopped answering")
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise _WorkerLost(False, "the worker died")
            data += chunk
        return bytes(data)

    def _error_tail(self) -> str:
        self.errors.seek(0)
        return self.errors.read()[-2000:].decode("utf-8", "replace").strip() or "no error output"

    def stop(self, patience: float = 0.0) -> None:
        """Kill the worker and its jail. With `patience`, first let an idle one exit on its own (end of
        input) for up to that many seconds: that wait returns only once its jail is empty (bubblewrap
        outlives every process of the pid namespace), where a kill returns while the jail is still dying."""
        if self.process is not None:
            if patience:
                self.process.stdin.close()
                try:
                    self.process.wait(patience)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                stream.close()
            self.process = None
        if self.errors is not None:
            self.errors.close()
            self.errors = None
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


# ------------------------------------------------------------------------------------- the pools


class _Pool:
    """Workers that import the same modules up front, started together on first use."""

    def __init__(self, jail: _Jail, indices: range, preload: list[str]):
        self.jail, self.indices, self.preload = jail, indices, preload
        self.idle: queue.Queue[_Worker] = queue.Queue()
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()

    def ensure_started(self) -> None:
        """Start every worker at once (each takes a while to import its preloads)."""
        with self.lock:
            if self.workers:
                return
            workers = [_Worker(index, self.jail, self.preload) for index in self.indices]
            with ThreadPoolExecutor(len(workers)) as pool:
                failures = [error for error in pool.map(_try_start, workers) if error]
            if failures:
                for worker in workers:
                    worker.stop()
                raise failures[0]
            self.workers = workers
            for worker in workers:
                self.idle.put(worker)

    def close(self) -> None:
        with self.lock:
            for worker in self.workers:
                worker.stop(patience=STOP_SECONDS)
            self.workers.clear()
            self.idle = queue.Queue()


_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\w+)|import[ \t]+([\w \t.,]+))", re.M)


def imports_beyond_stdlib(*sources: str) -> bool:
    """Whether any source imports a module outside the standard library (numpy, pandas...)."""
    for source in sources:
        for match in _IMPORT.finditer(source):
            names = [match.group(1)] if match.group(1) else \
                [part.split()[0].split(".")[0] for part in match.group(2).split(",") if part.split()]
            if any(name not in sys.stdlib_module_names for name in names):
                return True
    return False


class LocalPools:
    """Pools of warm, jailed workers on this machine.

    Forking a worker that has imported numpy and pandas costs several times what forking one with
    the standard library alone does (page tables of ~100 MB, copied at fork and torn down at exit),
    so there are two pools of `size` workers each, in jails of their own: samples whose program or
    tests import something beyond the standard library go to the one that preloads
    `sandbox.preload_modules`, the rest to the light one. Each pool starts on first use; at most
    `size` samples run at once either way.

    `slot` tells several sandboxes on one machine apart (one per training process): each numbers its
    workers, and so picks their uids, after the previous slots', so that no two workers share a uid
    (a shared uid would share RLIMIT_NPROC, and a worker's sweep could kill the other's sample)."""

    def __init__(self, config: SandboxConfig, slot: int = 0):
        self.config = config
        self.jail = _Jail(config)
        self.size = config.workers or os.cpu_count() or 1
        first = 2 * self.size * slot
        self._light = _Pool(self.jail, range(first, first + self.size), [])
        self._heavy = _Pool(self.jail, range(first + self.size, first + 2 * self.size), list(config.preload_modules)) \
            if config.preload_modules else self._light

    @property
    def isolation(self) -> str:
        return self.jail.isolation

    def run(self, requests: list[ExecRequest], progress: bool = False) -> list[ExecResult]:
        self._light.ensure_started()
        if len(requests) <= 1:  # no thread hand-offs on the latency-critical single call
            return [self._execute(request) for request in requests]
        with ThreadPoolExecutor(self.size) as pool:
            results = pool.map(self._execute, requests)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(requests), desc="sandbox", unit="sample")
            return list(results)

    def trace(self, program: str, call: str, max_vars: int = 3, max_chars: int = 200) -> TraceResult:
        message = {"op": "trace", "program": program, "call": call, "max_vars": max_vars, "max_chars": max_chars}
        raw = self._call(message, self._pool_for(program))
        record = raw.get("record") or {}
        outcome, exception_type, note = _classify(raw, self.config)
        return TraceResult(outcome=outcome, output=record.get("output"), variables=record.get("variables", {}),
                           lines=record.get("lines", []), exception_type=exception_type,
                           stderr=_stderr(raw, note, self.config), cpu_s=raw.get("cpu_s", 0.0),
                           wall_s=raw.get("wall_s", 0.0))

    def close(self) -> None:
        self._light.close()
        self._heavy.close()

    def _pool_for(self, *sources: str) -> _Pool:
        return self._heavy if imports_beyond_stdlib(*sources) else self._light

    def _call(self, message: dict, pool: _Pool, meanwhile=None) -> dict:
        """Send one request to an idle worker of `pool`, run `meanwhile()` while it works; a lost
        worker becomes a raw report of its own."""
        pool.ensure_started()
        worker = pool.idle.get()
        try:
            reply = worker.call(message, self.config.wall_seconds + HOST_GRACE_SECONDS, meanwhile)
        except _WorkerLost as lost:
            return {"worker_lost": "hung" if lost.hung else "died", "cpu_s": 0.0, "wall_s": 0.0}
        finally:
            pool.idle.put(worker)
        if "server_error" in reply:
            raise SandboxError(f"sandbox worker failed: {reply['server_error']}")
        return reply

    def _execute(self, request: ExecRequest) -> ExecResult:
        if not request.program.strip():
            nothing = {"record": {"outcome": "no_code", "traceback": "there is no code to run"}}
            return _result(request, nothing, [], self.config)
        static: list[str] = []

        def check_statically() -> None:  # on the host, while the worker runs the sample
            static.extend(static_hallucinations(request.program))

        raw = self._call({"op": "exec", "program": request.program, "test": request.test,
                          "entry_point": request.entry_point, "test_style": request.test_style},
                         self._pool_for(request.program, request.test), check_statically)
        if not static and "worker_lost" in raw:
            check_statically()
        return _result(request, raw, static, self.config)


def _try_start(worker: _Worker) -> Exception | None:
    try:
        worker.start()
    except SandboxError as error:
        return error
    return None


# ------------------------------------------------------------------------------ classification


def _classify(raw: dict, config: SandboxConfig) -> tuple[str, str, str]:
    """(outcome, exception type, note) from the worker's raw report; the harness's record, when
    there is one with the right nonce, is the only way to a pass."""
    if "worker_lost" in raw:
        if raw["worker_lost"] == "hung":
            return "timeout", "WallTimeLimit", "the sandbox worker stopped answering; it was restarted"
        return "sandbox_violation", "WorkerKilled", ("the sandbox worker died while it ran the sample (killed by the "
                                                     "sample, most likely, or from outside); it was restarted")
    if raw.get("wall_timeout"):
        return "timeout", "WallTimeLimit", f"killed after {config.wall_seconds:g} s of wall-clock time"
    record = raw.get("record")
    if record is not None:
        return record["outcome"], record.get("exception_type", ""), ""
    code = raw["exit_code"]
    if code >= 0:
        return "runtime_error", "SystemExit", (
            f"the program exited with status {code} before the tests finished (sys.exit/os._exit): not a pass")
    name = signal.Signals(-code).name
    if -code == signal.SIGXCPU or (-code == signal.SIGKILL and raw["cpu_s"] >= math.ceil(config.cpu_seconds)):
        return "timeout", "CPUTimeLimit", f"killed after {config.cpu_seconds:g} s of CPU time"
    if any(sign in raw.get("stderr", "") for sign in ("MemoryError", "Cannot allocate memory", "bad_alloc")):
        return "memory_limit", "MemoryError", f"ran out of its {config.memory_mb} MB of memory ({name})"
    return "runtime_error", f"Crash:{name}", f"the process died of {name}"


def _stderr(raw: dict, note: str, config: SandboxConfig) -> str:
    record = raw.get("record") or {}
    parts = [raw.get("stderr", "").strip(), record.get("traceback", "").strip(), note]
    return "\n".join(part for part in parts if part)[-config.stderr_chars:]


def _result(request: ExecRequest, raw: dict, static: list[str], config: SandboxConfig) -> ExecResult:
    outcome, exception_type, note = _classify(raw, config)
    assert outcome in OUTCOMES, outcome
    record = raw.get("record") or {}
    runtime = list(record.get("evidence", []))
    evidence = static + runtime
    total = record.get("tests_total", 0)
    if request.test_style == "unittest":
        share = 1.0 if outcome == "passed" else (record.get("tests_passed", 0) / total if total else 0.0)
    else:
        share = math.nan
    return ExecResult(
        task_id=request.task_id,
        outcome=outcome,
        passed=outcome == "passed",
        hallucinated=bool(evidence),
        hallucination_evidence=evidence,
        hallucination_static=bool(static),
        hallucination_runtime=bool(runtime),
        exception_type=exception_type,
        failing_test=record.get("failing_test", ""),
        stderr=_stderr(raw, note, config),
        test_share=share,
        cpu_s=round(raw.get("cpu_s", 0.0), 4),
        wall_s=round(raw.get("wall_s", 0.0), 4),
    )
