"""Evaluation of one policy on held-out tasks: greedy and sampled programs, executed, summarised, and
the self-repair of the first run's failures. The evaluate stage and the learning benchmark both call
`evaluate_policy`, so they measure the same thing the same way."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from cosmocore.config import Config
from cosmocore.data.records import Task, Trajectory
from cosmocore.evaluation.metrics import hallucination_rates, mean_pass_at_k, outcome_taxonomy
from cosmocore.evaluation.repair import repair
from cosmocore.rl.rollout import RunIds, rollout
from cosmocore.sandbox.runner import Sandbox

GREEDY, SAMPLED = "greedy_", ""  # metric-name prefixes of the two runs


def summarise(samples: list[Trajectory], ks: list[int], prefix: str) -> dict:
    """pass@k (for each k the samples per task allow), hallucination rate and its parts, the outcome
    taxonomy and the sample count, each key starting with `prefix`."""
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


@dataclass
class Evaluation:
    metrics: dict
    samples: dict[str, list[Trajectory]]  # by run prefix: GREEDY and/or SAMPLED
    repair_attempts: dict[str, list[dict]]  # by run prefix, for the run whose failures were repaired


def evaluate_policy(model, tokenizer, tasks: list[Task], sandbox: Sandbox, cfg: Config, style: str, ids: RunIds,
                    desc: str = "evaluate") -> Evaluation:
    """Greedy programs (`eval.greedy`) and `eval.samples_per_task` sampled ones at `eval.temperature`
    for every task, executed and summarised; the first run's failures go through `eval.repair_rounds`
    rounds of self-repair."""
    runs = []
    if cfg.eval.greedy:
        runs.append((GREEDY, dict(samples_per_task=1, greedy=True)))
    if cfg.eval.samples_per_task > 1 or not cfg.eval.greedy:
        runs.append((SAMPLED, dict(samples_per_task=cfg.eval.samples_per_task, temperature=cfg.eval.temperature)))
    result = Evaluation({}, {}, {})
    for prefix, how in runs:
        samples, engine = rollout(model, tokenizer, tasks, sandbox, cfg.rollout, cfg.reward, style, ids,
                                  with_scores=False, desc=f"{desc} {prefix.rstrip('_') or 'sampled'}", **how)
        result.metrics |= summarise(samples, cfg.eval.k, prefix)
        if cfg.eval.repair_rounds and prefix == runs[0][0]:  # self-repair of the first run's failures
            fixed = repair(model, tokenizer, {t.task_id: t for t in tasks}, samples, sandbox, cfg.rollout, style,
                           cfg.eval.repair_rounds, ks=cfg.eval.repair_k, temperature=cfg.eval.temperature)
            result.metrics |= {f"{prefix}{k}": v for k, v in fixed["metrics"].items()}
            result.repair_attempts[prefix] = fixed["attempts"]
        result.metrics[f"{prefix}tokens_per_s"] = engine["tokens_per_s"]
        result.samples[prefix] = samples
    return result
