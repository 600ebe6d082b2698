"""The training stage for one variant and seed: `cosmocore.rl.run.train` (rollout → tag → gate → nocturnal
train, iterated, with checkpoints and resume) as a Prefect flow whose steps are tasks, tracked in MLflow,
where the trained policy is registered as the model `cosmocore-<variant>` (`flows/registry.py`).

With `train.processes: N` (N > 1) the stage starts itself again as N data-parallel processes
(`cosmocore.rl.distributed`): the main one runs this Prefect flow and writes every output, the others run
the flow's body without a flow run of their own.

    python -m flows.train --variant cosmocore --seed 0
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from cosmocore.config import ModelConfig, load_config
from cosmocore.errors import CosmoCoreError
from cosmocore.rl import run
from cosmocore.rl.distributed import is_main_process, launched_world_size, uses_cpu
from flows.common import CONFIG_DIR, die_with_parent, run_main
from flows.registry import log_policy
from flows.tracking import Tracker

TRAINING_SECTIONS = ("model", "rollout", "reward", "affect", "buffer", "train", "sandbox", "alignment")


def _step(function, *args):
    """Run one step of the iteration: as a Prefect task in the flow run (the main process), as a plain
    call in the other processes of a multi-process run, which have no flow run: N processes make one
    flow run and one set of task runs, not N."""
    if FlowRunContext.get():
        return task(function, name=function.__name__, cache_policy=NO_CACHE)(*args)
    return function(*args)


@flow(name="cosmocore-train", log_prints=True)
def train_flow(variant: str, seed: int, tasks_path: str = "data/prepared/train.jsonl",
               model_dir: str = "data/model/base", out_root: str = "data/runs") -> dict:
    """The training stage as a Prefect flow (in a multi-process run, the main process's)."""
    return train(variant, seed, tasks_path, model_dir, out_root)


def train(variant: str, seed: int, tasks_path: str = "data/prepared/train.jsonl",
          model_dir: str = "data/model/base", out_root: str = "data/runs") -> dict:
    """Train one variant and seed, resuming its saved state; every process of the run calls this."""
    cfg = load_config(CONFIG_DIR)
    tasks_path, model_dir = Path(tasks_path), Path(model_dir)
    inputs = [*(CONFIG_DIR / f"{name}.json" for name in TRAINING_SECTIONS), tasks_path, model_dir / "config.json", Path(__file__)]
    tracker = (Tracker(CONFIG_DIR, cfg.tracking, "train", cfg.profile, tags={"variant": variant, "seed": seed})
               if is_main_process() else None)
    run_dir = Path(out_root) / f"{variant}-s{seed}"
    with tracker or nullcontext():
        final = run.train(cfg, variant, seed, tasks_path, model_dir, run_dir, run.fingerprint(variant, seed, inputs),
                          step=_step, observer=tracker)
        if tracker is not None and cfg.tracking.log_models:
            print(f"{variant}-s{seed}: policy registered as {log_policy(tracker, variant, model_dir, run_dir / 'policy', CONFIG_DIR)}")
        return final


def _relaunch(variant: str, seed: int, processes: int, model: ModelConfig) -> int:
    """Run this stage as `processes` processes on this machine and wait for them: torchrun, the launcher
    `accelerate launch` itself uses for several local processes (its `--cpu` mode would start one: it
    launches multi-CPU runs through MPI). Each process sets itself up from the launcher's environment
    (`cosmocore.rl.distributed.start`); they inherit this one's Prefect server, and stop if it dies."""
    if not uses_cpu(model) and torch.cuda.device_count() < processes:  # NCCL cannot put two processes on one GPU
        raise CosmoCoreError(f"train.processes is {processes} but this machine has {torch.cuda.device_count()} GPU(s): "
                             "set it to at most that many, or model.device to cpu for CPU processes")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "flows.train", "--variant", variant, "--seed", str(seed)]
    return subprocess.run(command, preexec_fn=die_with_parent).returncode


def main() -> None:
    if launched_world_size() > 1:
        # torchrun starts each process in a session of its own, which outlives a SIGKILLed torchrun: an
        # orphan would go on writing checkpoints beside the run that resumes them. End with torchrun.
        die_with_parent(signal.SIGKILL)
        if os.getppid() == 1:  # torchrun died before that
            sys.exit("the launcher that started this process is gone")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()

    def stage() -> None:
        cfg = load_config(CONFIG_DIR)
        if cfg.train.processes > 1 and launched_world_size() == 1:  # not yet started by a launcher
            sys.exit(_relaunch(args.variant, args.seed, cfg.train.processes, cfg.model))
        (train_flow if is_main_process() else train)(args.variant, args.seed)

    run_main(stage)


if __name__ == "__main__":
    main()
