"""The evaluate stage: held-out pass@k, greedy pass@1, hallucination rate (static and run-time parts)
and the outcome taxonomy of one policy: the base model, or a trained variant and seed.

    python -m flows.evaluate --policy base
    python -m flows.evaluate --policy cosmocore-s0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from prefect import flow

from cosmocore.alignment.coderl import answer, output_prediction_tasks
from cosmocore.config import load_config
from cosmocore.data.datasets import guard_split
from cosmocore.data.records import read_samples_log, read_tasks, write_trajectories
from cosmocore.evaluation.evaluate import evaluate_policy
from cosmocore.evaluation.metrics import time_to_correction
from cosmocore.files import file_digest, write_frame, write_json
from cosmocore.policy.models import load_policy
from cosmocore.policy.prompts import resolve_style
from cosmocore.rl.rollout import RunIds
from cosmocore.sandbox.runner import Sandbox
from flows.common import CONFIG_DIR, run_main
from flows.tracking import Tracker


def execution_reasoning(model, tokenizer, tasks, sandbox, cfg, style, ids) -> dict:
    """CRUXEval-O style: given a reference solution and a test input, predict the output (greedy)."""
    questions = output_prediction_tasks(tasks, sandbox, cfg.alignment)
    answers = answer(model, tokenizer, questions, cfg.rollout, cfg.alignment, style, ids, greedy=True, with_scores=False)
    n = max(1, len(answers))
    return {"exec_output_accuracy": sum(t.outcome == "passed" for t in answers) / n,
            "exec_alignment_reward": sum(t.reward for t in answers) / n, "exec_tasks": len(answers)}


@flow(name="cosmocore-evaluate", log_prints=True)
def evaluate_flow(policy: str, tasks_path: str = "data/prepared/eval.jsonl", train_path: str = "data/prepared/train.jsonl",
                  model_dir: str = "data/model/base", runs_root: str = "data/runs", out_root: str = "data/eval",
                  metrics_root: str = "data/metrics/eval") -> dict:
    cfg = load_config(CONFIG_DIR)
    tasks = read_tasks(tasks_path)
    guard_split({t.task_id for t in tasks}, {t.task_id for t in read_tasks(train_path)})
    trained = None if policy == "base" else Path(runs_root) / policy / "policy"
    model, tokenizer = load_policy(model_dir, cfg.model, trained=trained)
    style = resolve_style(cfg.model.prompt_style, tokenizer)
    out_dir = Path(out_root) / policy
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = RunIds(run=f"eval/{policy}", variant=policy, seed=0, iteration=0)
    metrics: dict = {}
    variant, _, seed = policy.rpartition("-s") if policy != "base" else ("base", "", "")
    tags = {"policy": policy, "variant": variant, "seed": seed}
    with Sandbox(cfg.sandbox) as sandbox, Tracker(CONFIG_DIR, cfg.tracking, "evaluate", cfg.profile, tags=tags) as tracker:
        evaluation = evaluate_policy(model, tokenizer, tasks, sandbox, cfg, style, ids, desc=f"evaluate {policy}")
        metrics |= evaluation.metrics
        for prefix, samples in evaluation.samples.items():
            write_trajectories(samples, out_dir / f"{prefix or 'sampled_'}samples.parquet")
        for prefix, attempts in evaluation.repair_attempts.items():
            write_frame(out_dir / f"{prefix or 'sampled_'}repair.parquet", pd.DataFrame(attempts))
        if cfg.alignment.eval_tasks:
            metrics |= execution_reasoning(model, tokenizer, tasks, sandbox, cfg, style, ids)
        log_path = Path(runs_root) / policy / "samples_log.parquet"
        if trained is not None and log_path.exists():
            log = read_samples_log(log_path)
            ttc = time_to_correction(log, horizon=cfg.train.iterations)
            metrics |= {f"ttc_{k}": v for k, v in ttc.items()}
            if "optimizer_steps" in log:  # also in optimizer updates, over the same pairs
                in_updates = time_to_correction(log, horizon=cfg.train.updates_budget, unit="updates")
                metrics |= {"ttc_updates_mean": in_updates["mean"], "ttc_updates_km_mean": in_updates["km_mean"],
                            "ttc_updates_horizon": cfg.train.updates_budget}
        metrics["tasks"] = len(tasks)
        write_json(Path(metrics_root) / f"{policy}.json", metrics)
        tracker.log_params({**tags, "eval": cfg.eval.model_dump()})
        if trained is not None:  # a content hash of the evaluated checkpoint
            tracker.log_params({"policy_hash": file_digest([trained])})
        tracker.log_metrics(metrics)
    print(f"evaluate {policy}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if "pass_at_" in k or k.endswith("hallucination_rate")))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="base, or <variant>-s<seed> of a trained run")
    args = parser.parse_args()
    run_main(lambda: evaluate_flow(args.policy))


if __name__ == "__main__":
    main()
