"""Benchmark: batched sample + priority update on a prioritized buffer, CosmoCore's sum tree vs cpprb.

Both buffers hold the same entries (small ints) with the same priorities, α and ε; one operation is
`sample(batch)` followed by `update_priorities` of the drawn slots, as in the nocturnal phase. Ours
goes through the `per` variant's path of `ReplayBuffer` (entries gathered, IS weights computed), cpprb
through `PrioritizedReplayBuffer` (a C++ segment tree). Timing rounds alternate between the two so
that load on the machine hits both alike; the median round is reported.

    python -m cosmocore.bench.buffer [--entries 1000000] [--batch 256] [--rounds 9] [--steps 300]

Memory per entry counts the priority structures only: ours exactly (float64 sum and min trees), cpprb
by the growth of resident memory over a plain cpprb.ReplayBuffer holding the same data.
The last line is `RESULT buffer_speedup <ours ops/s ÷ cpprb ops/s>`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cpprb
import numpy as np

from cosmocore.config import load_params
from cosmocore.rl.buffer import ReplayBuffer

PAGE_BYTES = 4096


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE_BYTES


def ops_per_second(step: Callable[[np.ndarray], None], td_pool: list[np.ndarray], steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        step(td_pool[i % len(td_pool)])
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=300, help="sample+update operations per round")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    cfg = load_params(args.params).buffer.model_copy(update={"capacity": args.entries})
    rng = np.random.default_rng(0)
    td = rng.exponential(1.0, args.entries)
    td_pool = [rng.exponential(1.0, args.batch) for _ in range(64)]
    env_dict = {"entry": {"dtype": np.int64}}
    print(f"filling both buffers with {args.entries:,} entries (batch {args.batch})", flush=True)

    before = resident_bytes()
    plain = cpprb.ReplayBuffer(args.entries, env_dict)
    plain.add(entry=np.arange(args.entries))
    plain_bytes = resident_bytes() - before
    del plain
    before = resident_bytes()
    theirs = cpprb.PrioritizedReplayBuffer(args.entries, env_dict, alpha=cfg.priority_alpha, eps=cfg.priority_epsilon)
    theirs.add(entry=np.arange(args.entries), priorities=td + cfg.priority_epsilon)
    theirs_per_entry = (resident_bytes() - before - plain_bytes) / args.entries

    ours = ReplayBuffer(cfg, "per", seed=0)
    zeros = np.zeros(args.entries)
    ours.add(list(range(args.entries)), zeros, zeros, zeros, td=td)
    ours_per_entry = ours.priority_nbytes / args.entries
    beta = cfg.beta_start + 0.5 * (1 - cfg.beta_start)

    def step_ours(batch_td: np.ndarray) -> None:
        batch = ours.sample(args.batch, progress=0.5)
        ours.update_priorities(batch.indices, batch_td)

    def step_theirs(batch_td: np.ndarray) -> None:
        batch = theirs.sample(args.batch, beta=beta)
        theirs.update_priorities(batch["indexes"], batch_td)  # cpprb adds ε itself

    for step in (step_ours, step_theirs):  # warm caches and allocators
        ops_per_second(step, td_pool, 20)
    rates: dict[str, list[float]] = {"cosmocore": [], "cpprb": []}
    for round_ in range(args.rounds):
        order = [("cosmocore", step_ours), ("cpprb", step_theirs)]
        for name, step in order if round_ % 2 == 0 else order[::-1]:
            rates[name].append(ops_per_second(step, td_pool, args.steps))
        print(f"round {round_ + 1}/{args.rounds}: cosmocore {rates['cosmocore'][-1]:,.0f} ops/s, "
              f"cpprb {rates['cpprb'][-1]:,.0f} ops/s", flush=True)

    ours_rate, theirs_rate = (statistics.median(rates[name]) for name in ("cosmocore", "cpprb"))
    print(f"cosmocore (numpy sum tree, float64): {ours_rate:,.0f} sample+update ops/s "
          f"({ours_rate * args.batch:,.0f} entries/s), {ours_per_entry:.1f} bytes/entry of priority structures")
    print(f"cpprb PrioritizedReplayBuffer (C++): {theirs_rate:,.0f} sample+update ops/s "
          f"({theirs_rate * args.batch:,.0f} entries/s), {theirs_per_entry:.1f} bytes/entry of priority structures")
    print(f"RESULT buffer_speedup {ours_rate / theirs_rate:.3f}")


if __name__ == "__main__":
    main()
