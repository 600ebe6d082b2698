"""One training run (a variant and a seed): the iteration loop, its checkpoints and its resume.

Everything a resumed run needs (checkpoint, buffer, loop state, rollouts) is written per iteration under
`<run_dir>/state/`, atomically, so a run killed at any point resumes from the last finished iteration
with nothing lost or duplicated. A saved state made with another configuration, other tasks, another
base model or other code (its `fingerprint`) is discarded: the run starts afresh.

The training stage's flow (`flows/train.py`) calls `train` with a Prefect task as `step` and an MLflow
`Observer`; anything else (a test, a notebook) can call it with neither.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import pandas as pd

from cosmocore.config import Config
from cosmocore.data.records import read_tasks, write_trajectories
from cosmocore.files import atomic_path, file_digest, write_frame, write_json, write_text
from cosmocore.policy.models import load_policy
from cosmocore.policy.prompts import resolve_style
from cosmocore.rl.distributed import start
from cosmocore.rl.loop import LoopState, Step, Training, direct, run_iteration
from cosmocore.rl.mixing import load_buffer, make_buffer
from cosmocore.rl.trainer import build_learner, load_checkpoint, save_checkpoint, save_policy
from cosmocore.sandbox.runner import Sandbox
from cosmocore.variants import REGISTRY

log = logging.getLogger(__name__)

CODE = Path(__file__).parents[1]  # every file of the package is part of a saved state's fingerprint


class Observer(Protocol):
    """What a run reports as it goes (the flow's MLflow tracker); called by the main process only."""

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int, prefix: str = "") -> None: ...
    def log_artifact(self, path: Path) -> None: ...


def fingerprint(variant: str, seed: int, inputs: Iterable[str | os.PathLike]) -> str:
    """What a saved state was made with: `inputs` (the training config, the tasks, the base model, and
    any code outside the package, such as the flow) and the whole package's code. DVC re-runs the stage
    when its code changes; without the code here, the run would resume the old code's finished state
    and train nothing new."""
    return f"{variant}-{seed}-" + file_digest([*inputs, CODE])


def checkpoints(state_dir: Path) -> list[Path]:
    """The finished checkpoints, oldest first (a save in progress has a hidden temporary name)."""
    return sorted(state_dir.glob("iter_*[0-9]"), key=lambda checkpoint: int(checkpoint.name.split("_")[1]))


def latest_checkpoint(state_dir: Path) -> Path | None:
    done = checkpoints(state_dir)
    return done[-1] if done else None


def train(cfg: Config, variant: str, seed: int, tasks_path: Path, model_dir: Path, run_dir: Path, fingerprint: str,
          step: Step = direct, observer: Observer | None = None) -> dict:
    """Train one variant and seed for `cfg.train.iterations` iterations, resuming its saved state;
    every process of a multi-process run calls this. Writes the policy, the samples log, the
    per-iteration history and per-update diagnostics and the final training metrics under `run_dir`;
    returns the final metrics."""
    processes = start(cfg.model)
    key = f"{variant}-s{seed}"
    state_dir = run_dir / "state"
    checkpoint = None
    if processes.is_main:
        if (state_dir / "fingerprint").exists() and (state_dir / "fingerprint").read_text() != fingerprint:
            log.info("%s: configuration or code changed since the saved state; starting afresh", key)
            shutil.rmtree(state_dir)
        write_text(state_dir / "fingerprint", fingerprint)
        checkpoint = latest_checkpoint(state_dir)
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
            log.info("%s: resuming after iteration %d from %s", key, state.iteration - 1, checkpoint)

    observer = observer if processes.is_main else None
    if observer is not None:
        observer.log_params({"variant": variant, "seed": seed, "train": cfg.train.model_dump(), "buffer": cfg.buffer.model_dump(),
                             "rollout": cfg.rollout.model_dump(), "model.source": cfg.model.source,
                             "processes": processes.world})
    with Sandbox(processes.sandbox_config(cfg.sandbox), slot=processes.local_rank) as sandbox:
        run = Training(cfg, variant, seed, tasks, tokenizer, style, sandbox, learner, buffer, state, processes)
        while state.iteration < cfg.train.iterations:
            trajectories, metrics, per_update = run_iteration(run, step)
            i = state.iteration - 1
            if processes.is_main:
                write_trajectories(trajectories, state_dir / "rollouts" / f"iter_{i}.parquet")
                save_checkpoint(learner, state_dir / f"iter_{i}", {"loop": dataclasses.asdict(state)},
                                also=lambda folder: buffer.save(folder / "buffer.pt"))
                for old in checkpoints(state_dir)[: -cfg.train.keep_checkpoints]:
                    shutil.rmtree(old)
                if observer is not None:
                    observer.log_metrics(metrics, step=i)
                    for update in per_update:  # at the optimizer step, beside the per-iteration means
                        observer.log_metrics({k: v for k, v in update.items() if k != "step"}, step=update["step"], prefix="update_")
                log.info("%s iteration %d: pass %.3f halluc %.3f reward %.3f dream %.2f pruned %d", key, i,
                         metrics["train_pass_rate"], metrics["train_hallucination_rate"], metrics["train_reward"],
                         metrics.get("gate_dream_share", 0), metrics.get("gate_pruned", 0))
            processes.barrier()

        final = {k: v for k, v in state.history[-1].items() if isinstance(v, (int, float))}
        if processes.is_main:
            with atomic_path(run_dir / "policy") as folder:
                save_policy(learner, folder)
            write_frame(run_dir / "samples_log.parquet", pd.DataFrame(state.samples_log))
            write_frame(run_dir / "history.csv", pd.DataFrame(state.history))
            write_frame(run_dir / "updates.csv", pd.DataFrame(state.updates))
            write_json(run_dir / "train_metrics.json", final)
            if observer is not None:
                for name in ("history.csv", "updates.csv"):
                    observer.log_artifact(run_dir / name)
    processes.barrier()
    return final
