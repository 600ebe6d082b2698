"""The training stage for one variant and seed: rollout → tag → gate → nocturnal train, iterated.

Everything a resumed run needs (checkpoint, buffer, loop state, rollouts) is written per iteration
under `<run>/state/` (a DVC `persist` output), atomically, so a run killed at any point resumes from
the last finished iteration with nothing lost or duplicated. A change of config or code starts afresh.

    python -m flows.train --variant cosmocore --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import cosmocore
from cosmocore.config import load_config
from cosmocore.loop import LoopState, align, gate, nocturnal, rollout_metrics, tag
from cosmocore.mixing import ALIGNMENT_VARIANTS, load_buffer, make_buffer
from cosmocore.models import load_policy
from cosmocore.prompts import resolve_style
from cosmocore.records import read_tasks, trajectories_to_frame, write_trajectories
from cosmocore.rollout import RunIds, rollout
from cosmocore.sandbox import Sandbox
from cosmocore.trainer import build_learner, load_checkpoint, save_checkpoint, save_policy
from cosmocore.validation import raise_for_failures, validate_trajectories
from flows.common import CONFIG_DIR, file_digest, run_main, write_json
from flows.tracking import Tracker

TRAINING_SECTIONS = ("model", "rollout", "reward", "affect", "buffer", "train", "sandbox", "alignment")
TRAINING_CODE = (*sorted(Path(cosmocore.__file__).parent.glob("*.py")), Path(__file__))


@task(cache_policy=NO_CACHE)
def rollout_task(policy, tokenizer, tasks, sandbox, cfg, style, ids: RunIds):
    return rollout(policy, tokenizer, tasks, sandbox, cfg.rollout, cfg.reward, style, ids,
                   samples_per_task=cfg.rollout.samples_per_task, seed=ids.seed * 10_000 + ids.iteration,
                   desc=f"rollout {ids.variant} s{ids.seed} i{ids.iteration}")


@task(cache_policy=NO_CACHE)
def align_task(policy, tokenizer, tasks, trajectories, sandbox, cfg, style, ids: RunIds):
    """CodeRL+: questions about what this iteration's programs compute, answered by the policy."""
    return align(policy, tokenizer, tasks, trajectories, sandbox, cfg.alignment, cfg.rollout, style, ids)


@task(cache_policy=NO_CACHE)
def tag_task(trajectories, state, cfg, seed):
    _, metrics = tag(trajectories, state, cfg.affect, seed)
    raise_for_failures(validate_trajectories(trajectories_to_frame(trajectories)), "tagged trajectories")
    return metrics


@task(cache_policy=NO_CACHE)
def gate_task(buffer, trajectories):
    return gate(buffer, trajectories)


@task(cache_policy=NO_CACHE)
def nocturnal_task(learner, buffer, variant, cfg, iteration):
    start = time.perf_counter()
    tokens_before = learner.tokens
    metrics = nocturnal(learner, buffer, variant, cfg.train, iteration)
    elapsed = time.perf_counter() - start
    metrics["train_steps_per_s"] = metrics["updates"] / elapsed
    metrics["train_tokens_per_s"] = (learner.tokens - tokens_before) / elapsed
    return metrics


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
    cfg = load_config(CONFIG_DIR)
    key = f"{variant}-s{seed}"
    run_dir, tasks_path, model_dir = Path(out_root) / key, Path(tasks_path), Path(model_dir)
    state_dir = run_dir / "state"
    fingerprint = _fingerprint(variant, seed, tasks_path, model_dir)
    if (state_dir / "fingerprint").exists() and (state_dir / "fingerprint").read_text() != fingerprint:
        print(f"{key}: configuration or code changed since the saved state; starting afresh")
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "fingerprint").write_text(fingerprint)

    tasks = read_tasks(tasks_path)
    policy, tokenizer = load_policy(model_dir, cfg.model)
    style = resolve_style(cfg.model.prompt_style, tokenizer)
    learner = build_learner(policy, cfg.train, tokenizer.pad_token_id, cfg.rollout.temperature, seed=seed)
    buffer, state = make_buffer(cfg.buffer, variant, seed, cfg.alignment.share), LoopState()
    checkpoint = _latest_checkpoint(state_dir)
    if checkpoint is not None:
        state = LoopState(**load_checkpoint(learner, checkpoint)["loop"])
        buffer = load_buffer(checkpoint / "buffer.pt", cfg.buffer, variant, cfg.alignment.share)
        print(f"{key}: resuming after iteration {state.iteration - 1} from {checkpoint}")

    tracker = Tracker(CONFIG_DIR, cfg.tracking, "train", cfg.profile, tags={"variant": variant, "seed": seed})
    tracker.log_params({"variant": variant, "seed": seed, "train": cfg.train.model_dump(), "buffer": cfg.buffer.model_dump(),
                        "rollout": cfg.rollout.model_dump(), "model.source": cfg.model.source})
    with Sandbox(cfg.sandbox) as sandbox, tracker:
        while state.iteration < cfg.train.iterations:
            i = state.iteration
            ids = RunIds(run=key, variant=variant, seed=seed, iteration=i)
            trajectories, engine = rollout_task(learner.model, tokenizer, tasks, sandbox, cfg, style, ids)
            metrics = {**rollout_metrics(trajectories), "rollout_tokens_per_s": engine["tokens_per_s"]}
            if variant in ALIGNMENT_VARIANTS:
                answers, align_metrics = align_task(learner.model, tokenizer, tasks, trajectories, sandbox, cfg, style, ids)
                trajectories, metrics = trajectories + answers, metrics | align_metrics
            metrics |= tag_task(trajectories, state, cfg, seed)
            metrics |= gate_task(buffer, trajectories)
            metrics |= nocturnal_task(learner, buffer, variant, cfg, i)
            metrics["iteration"], metrics["optimizer_steps"] = i, learner.steps
            write_trajectories(trajectories, state_dir / "rollouts" / f"iter_{i}.parquet")
            state.history.append(metrics)
            state.samples_log += [{"iteration": i, "task_id": t.task_id, "outcome": t.outcome, "hallucinated": t.hallucinated,
                                   "optimizer_steps": learner.steps} for t in trajectories if t.kind == "code"]
            state.iteration = i + 1
            save_checkpoint(learner, state_dir / f"iter_{i}", {"loop": dataclasses.asdict(state)},
                            also=lambda folder: buffer.save(folder / "buffer.pt"))
            for old in sorted(state_dir.glob("iter_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))[: -cfg.train.keep_checkpoints]:
                shutil.rmtree(old)
            tracker.log_metrics(metrics, step=i)
            print(f"{key} iteration {i}: pass {metrics['train_pass_rate']:.3f} halluc {metrics['train_hallucination_rate']:.3f} "
                  f"reward {metrics['train_reward']:.3f} dream {metrics.get('gate_dream_share', 0):.2f} "
                  f"pruned {metrics.get('gate_pruned', 0)}")

        save_policy(learner, run_dir / "policy")
        pd.DataFrame(state.samples_log).to_parquet(run_dir / "samples_log.parquet", index=False)
        pd.DataFrame(state.history).to_csv(run_dir / "history.csv", index=False)
        final = {k: v for k, v in state.history[-1].items() if isinstance(v, (int, float))}
        write_json(run_dir / "train_metrics.json", final)
        tracker.log_artifact(run_dir / "history.csv")
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args()
    run_main(lambda: train_flow(args.variant, args.seed))


if __name__ == "__main__":
    main()
