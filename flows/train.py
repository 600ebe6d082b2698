"""The training stage for one variant and seed: rollout → tag → gate → nocturnal train, iterated.

Everything a resumed run needs (checkpoint, buffer, loop state, rollouts) is written per iteration
under `<run>/state/` (a DVC `persist` output), atomically, so a run killed at any point resumes from
the last finished iteration with nothing lost or duplicated. A change of config or code starts afresh.

With `train.processes: N` (N > 1) the stage starts itself again as N data-parallel processes
(`cosmocore.distributed`): the main one runs this Prefect flow and writes every output, the others run
the flow's body without a flow run of their own.

    python -m flows.train --variant cosmocore --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

import cosmocore
from cosmocore.atomic import write_json
from cosmocore.config import ModelConfig, load_config
from cosmocore.distributed import is_main_process, launched_world_size, start, uses_cpu
from cosmocore.errors import CosmoCoreError
from cosmocore.loop import LoopState, Training, run_iteration
from cosmocore.mixing import load_buffer, make_buffer
from cosmocore.models import load_policy
from cosmocore.prompts import resolve_style
from cosmocore.records import read_tasks, write_trajectories
from cosmocore.sandbox import Sandbox
from cosmocore.trainer import build_learner, load_checkpoint, save_checkpoint, save_policy
from cosmocore.variants import REGISTRY
from flows.common import CONFIG_DIR, die_with_parent, file_digest, run_main
from flows.tracking import Tracker

TRAINING_SECTIONS = ("model", "rollout", "reward", "affect", "buffer", "train", "sandbox", "alignment")
TRAINING_CODE = (*sorted(Path(cosmocore.__file__).parent.glob("*.py")), Path(__file__))


def _step(function, *args):
    """Run one step of the iteration: as a Prefect task in the flow run (the main process), as a plain
    call in the other processes of a multi-process run, which have no flow run: N processes make one
    flow run and one set of task runs, not N."""
    if FlowRunContext.get():
        return task(function, name=function.__name__, cache_policy=NO_CACHE)(*args)
    return function(*args)


def _fingerprint(variant: str, seed: int, tasks_path: Path, model_dir: Path) -> str:
    """What a saved state was made with: the training config, the tasks, the base model and the code.
    DVC re-runs this stage when its code changes; without the code here, the run would resume the old
    code's finished state and train nothing new."""
    sections = [CONFIG_DIR / f"{name}.json" for name in TRAINING_SECTIONS]
    return f"{variant}-{seed}-" + file_digest(*sections, tasks_path, model_dir / "config.json", *TRAINING_CODE)


def _latest_checkpoint(state_dir: Path) -> Path | None:
    done = sorted(state_dir.glob("iter_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))
    return done[-1] if done else None


@flow(name="cosmocore-train", log_prints=True)
def train_flow(variant: str, seed: int, tasks_path: str = "data/prepared/train.jsonl",
               model_dir: str = "data/model/base", out_root: str = "data/runs") -> dict:
    """The training stage as a Prefect flow (in a multi-process run, the main process's)."""
    return train(variant, seed, tasks_path, model_dir, out_root)


def train(variant: str, seed: int, tasks_path: str = "data/prepared/train.jsonl",
          model_dir: str = "data/model/base", out_root: str = "data/runs") -> dict:
    """Train one variant and seed, resuming its saved state; every process of the run calls this."""
    cfg = load_config(CONFIG_DIR)
    processes = start(cfg.model)
    key = f"{variant}-s{seed}"
    run_dir, tasks_path, model_dir = Path(out_root) / key, Path(tasks_path), Path(model_dir)
    state_dir = run_dir / "state"
    checkpoint = None
    if processes.is_main:
        fingerprint = _fingerprint(variant, seed, tasks_path, model_dir)
        if (state_dir / "fingerprint").exists() and (state_dir / "fingerprint").read_text() != fingerprint:
            print(f"{key}: configuration or code changed since the saved state; starting afresh")
            shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "fingerprint").write_text(fingerprint)
        checkpoint = _latest_checkpoint(state_dir)
    checkpoint = processes.broadcast(checkpoint)  # every process resumes from the same one

    tasks = read_tasks(tasks_path)
    policy, tokenizer = load_policy(model_dir, processes.model_config(cfg.model))
    style = resolve_style(cfg.model.prompt_style, tokenizer)
    learner = build_learner(policy, cfg.train, tokenizer.pad_token_id, cfg.rollout.temperature, seed=seed, processes=processes,
                            use_critic=REGISTRY[variant].use_critic)
    buffer, state = make_buffer(cfg.buffer, variant, seed, cfg.alignment.share), LoopState()
    if checkpoint is not None:
        state = LoopState(**load_checkpoint(learner, checkpoint)["loop"])
        buffer = load_buffer(checkpoint / "buffer.pt", cfg.buffer, variant, cfg.alignment.share)
        if processes.is_main:
            print(f"{key}: resuming after iteration {state.iteration - 1} from {checkpoint}")

    tracker = None
    if processes.is_main:
        tracker = Tracker(CONFIG_DIR, cfg.tracking, "train", cfg.profile, tags={"variant": variant, "seed": seed})
        tracker.log_params({"variant": variant, "seed": seed, "train": cfg.train.model_dump(), "buffer": cfg.buffer.model_dump(),
                            "rollout": cfg.rollout.model_dump(), "model.source": cfg.model.source,
                            "processes": processes.world})
    with Sandbox(processes.sandbox_config(cfg.sandbox), slot=processes.local_rank) as sandbox, tracker or nullcontext():
        run = Training(cfg, variant, seed, tasks, tokenizer, style, sandbox, learner, buffer, state, processes)
        while state.iteration < cfg.train.iterations:
            trajectories, metrics, per_update = run_iteration(run, _step)
            i = state.iteration - 1
            if processes.is_main:
                write_trajectories(trajectories, state_dir / "rollouts" / f"iter_{i}.parquet")
                save_checkpoint(learner, state_dir / f"iter_{i}", {"loop": dataclasses.asdict(state)},
                                also=lambda folder: buffer.save(folder / "buffer.pt"))
                for old in sorted(state_dir.glob("iter_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))[: -cfg.train.keep_checkpoints]:
                    shutil.rmtree(old)
                tracker.log_metrics(metrics, step=i)
                for update in per_update:  # at the optimizer step, beside the per-iteration means
                    tracker.log_metrics({k: v for k, v in update.items() if k != "step"}, step=update["step"], prefix="update_")
                print(f"{key} iteration {i}: pass {metrics['train_pass_rate']:.3f} halluc {metrics['train_hallucination_rate']:.3f} "
                      f"reward {metrics['train_reward']:.3f} dream {metrics.get('gate_dream_share', 0):.2f} "
                      f"pruned {metrics.get('gate_pruned', 0)}")
            processes.barrier()

        final = {k: v for k, v in state.history[-1].items() if isinstance(v, (int, float))}
        if processes.is_main:
            save_policy(learner, run_dir / "policy")
            pd.DataFrame(state.samples_log).to_parquet(run_dir / "samples_log.parquet", index=False)
            pd.DataFrame(state.history).to_csv(run_dir / "history.csv", index=False)
            pd.DataFrame(state.updates).to_csv(run_dir / "updates.csv", index=False)
            write_json(run_dir / "train_metrics.json", final)
            tracker.log_artifact(run_dir / "history.csv")
            tracker.log_artifact(run_dir / "updates.csv")
    processes.barrier()
    return final


def _relaunch(variant: str, seed: int, processes: int, model: ModelConfig) -> int:
    """Run this stage as `processes` processes on this machine and wait for them: torchrun, the launcher
    `accelerate launch` itself uses for several local processes (its `--cpu` mode would start one: it
    launches multi-CPU runs through MPI). Each process sets itself up from the launcher's environment
    (`cosmocore.distributed.start`); they inherit this one's Prefect server, and stop if it dies."""
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
