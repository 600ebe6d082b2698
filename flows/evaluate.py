"""The evaluate stage: held-out pass@k, greedy pass@1, hallucination rate (static and run-time parts)
and the outcome taxonomy of one policy: the base model, or a trained variant and seed.

    python -m flows.evaluate --policy base
    python -m flows.evaluate --policy cosmocore-s0
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import pandas as pd
from prefect import flow

from cosmocore.alignment import answer, output_prediction_tasks
from cosmocore.config import load_config
from cosmocore.datasets import guard_split
from cosmocore.metrics import hallucination_rates, mean_pass_at_k, outcome_taxonomy, time_to_correction
from cosmocore.models import load_policy
from cosmocore.prompts import resolve_style
from cosmocore.records import Trajectory, read_tasks, write_trajectories
from cosmocore.repair import repair
from cosmocore.rollout import RunIds, rollout
from cosmocore.sandbox import Sandbox
from flows.common import CONFIG_DIR, file_digest, run_main, write_json
from flows.tracking import Tracker


def summarise(samples: list[Trajectory], ks: list[int], prefix: str) -> dict:
    by_task: dict[str, list[bool]] = defaultdict(list)
    for t in samples:
        by_task[t.task_id].append(t.outcome == "passed")
    per_task = [(len(v), sum(v)) for v in by_task.values()]
    n = min(count for count, _ in per_task)
    metrics = {f"{prefix}pass_at_{k}": mean_pass_at_k(per_task, k) for k in ks if k <= n}
    rates = hallucination_rates((t.extra.get("static", False), t.extra.get("runtime", False)) for t in samples)
    metrics |= {f"{prefix}hallucination_{k}" if k != "rate" else f"{prefix}hallucination_rate": v for k, v in rates.items()}
    metrics |= {f"{prefix}outcome_{k}": v for k, v in outcome_taxonomy(t.outcome for t in samples).items()}
    metrics[f"{prefix}samples"] = len(samples)
    return metrics


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
        runs = []
        if cfg.eval.greedy:
            runs.append(("greedy_", dict(samples_per_task=1, greedy=True)))
        if cfg.eval.samples_per_task > 1 or not cfg.eval.greedy:
            runs.append(("", dict(samples_per_task=cfg.eval.samples_per_task, temperature=cfg.eval.temperature)))
        for prefix, how in runs:
            samples, engine = rollout(model, tokenizer, tasks, sandbox, cfg.rollout, cfg.reward, style, ids,
                                      with_scores=False, desc=f"evaluate {policy} {prefix or 'sampled'}", **how)
            metrics |= summarise(samples, cfg.eval.k, prefix)
            if cfg.eval.repair_rounds and prefix == runs[0][0]:  # self-repair of the first run's failures
                fixed = repair(model, tokenizer, {t.task_id: t for t in tasks}, samples, sandbox, cfg.rollout, style,
                               cfg.eval.repair_rounds, ks=cfg.eval.repair_k, temperature=cfg.eval.temperature)
                metrics |= {f"{prefix}{k}": v for k, v in fixed["metrics"].items()}
                pd.DataFrame(fixed["attempts"]).to_parquet(out_dir / f"{prefix or 'sampled_'}repair.parquet")
            metrics[f"{prefix}tokens_per_s"] = engine["tokens_per_s"]
            write_trajectories(samples, out_dir / f"{prefix or 'sampled_'}samples.parquet")
        if cfg.alignment.eval_tasks:
            metrics |= execution_reasoning(model, tokenizer, tasks, sandbox, cfg, style, ids)
        log_path = Path(runs_root) / policy / "samples_log.parquet"
        if trained is not None and log_path.exists():
            log = pd.read_parquet(log_path)
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
            tracker.log_params({"policy_hash": file_digest(trained)})
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
