"""The learning benchmark: does training make the policy better than the model it started from?

    cosmocore bench learning --size smoke|cpu|gpu [--arms base,on_policy,grpo,cosmocore] [--set train.lr=1e-5] [--out DIR]

Every arm (a variant of `variants.REGISTRY`) trains from the same base with the same budget (the
`bench_<size>` profile of `params.yaml`, with any `--set section.key=value` over it); the base is
evaluated once and shared. The base and every
trained policy are evaluated on the same held-out tasks with `eval.samples_per_task` sampled programs
per task at `eval.temperature`, plus greedy, and one round of self-repair of the greedy failures.

The primary comparison is each trained arm against the base; the second, against the on-policy arm.
Differences are paired by task: the per-task rates of two policies are differenced and the tasks
resampled (percentile bootstrap, 2,000 resamples, `report.resample_indices`), so a task both policies
find hard counts once. The smallest detectable effect is that of a two-proportion test with the
programs each policy wrote (`metrics.minimum_detectable_effect`, 80% power at 5%), a conservative
bound for the paired design. It runs without Prefect, MLflow or DVC, so one device command can run it.

Output under `--out`: `learning.json` (every number, each arm's training history and per-update
diagnostics), `curves.png` (train curves per iteration and time to correction), `heldout.png` (held-out
rates with their intervals); on stdout one `RESULT learning ARM ...` line per arm.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cosmocore.config import Config, load_params
from cosmocore.data.datasets import prepare
from cosmocore.data.records import read_tasks, trajectories_to_frame
from cosmocore.errors import CosmoCoreError
from cosmocore.evaluation.evaluate import GREEDY, SAMPLED, evaluate_policy
from cosmocore.evaluation.metrics import minimum_detectable_effect, time_to_correction
from cosmocore.evaluation.report import Estimate, interval, per_task_heldout, plot_heldout, plot_learning_curves, resample_indices, ttc_pairs_by_task
from cosmocore.files import write_text
from cosmocore.logs import setup_logging
from cosmocore.policy.models import load_policy, materialise
from cosmocore.policy.prompts import resolve_style
from cosmocore.rl.loop import LoopState, Training, run_iteration
from cosmocore.rl.mixing import make_buffer
from cosmocore.rl.rollout import RunIds
from cosmocore.rl.trainer import build_learner
from cosmocore.sandbox.runner import Sandbox
from cosmocore.variants import REGISTRY, VARIANTS

log = logging.getLogger(__name__)

SIZES = ("smoke", "cpu", "gpu")
ARMS = ("base", "on_policy", "grpo", "cosmocore")
CONTROL = "on_policy"
RATES = {"halluc": "hallucination_rate", "pass": "pass_at_1", "no_code": "no_code_rate", "syntax": "syntax_error_rate"}
SEED = 0


def parse_arms(text: str) -> list[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a != "base" and a not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {unknown}: choose base or variants among {', '.join(VARIANTS)}")
    return ["base"] + [a for a in arms if a != "base"]  # the base is always evaluated, and first


def evaluate(model, tokenizer, tasks, sandbox: Sandbox, cfg: Config, style: str, arm: str) -> tuple[pd.DataFrame, dict]:
    """The per-task table of the sampled programs and the evaluation's metrics (greedy and repair too)."""
    evaluation = evaluate_policy(model, tokenizer, tasks, sandbox, cfg, style, RunIds(run=f"bench/{arm}", variant=arm, seed=SEED,
                                                                                      iteration=0), desc=f"evaluate {arm}")
    return per_task_heldout(trajectories_to_frame(evaluation.samples[SAMPLED])), evaluation.metrics


def train_arm(variant: str, cfg: Config, model_dir: Path, tasks, sandbox: Sandbox) -> tuple[object, object, LoopState]:
    """Train one arm from the base for `train.iterations` iterations, as the training stage does."""
    policy, tokenizer = load_policy(model_dir, cfg.model)
    style = resolve_style(cfg.model.prompt_style, tokenizer)
    learner = build_learner(policy, cfg.train, tokenizer.pad_token_id, cfg.rollout.temperature, seed=SEED,
                            use_critic=REGISTRY[variant].use_critic)
    run = Training(cfg, variant, SEED, tasks, tokenizer, style, sandbox, learner,
                   make_buffer(cfg.buffer, variant, SEED, cfg.alignment.share), LoopState())
    for _ in range(cfg.train.iterations):
        _, metrics, _ = run_iteration(run)
        print(f"{variant} iteration {metrics['iteration']}: train halluc {metrics['train_hallucination_rate']:.3f} "
              f"pass {metrics['train_pass_rate']:.3f} no_code {metrics['train_no_code_rate']:.3f} "
              f"advantage>0 {metrics.get('train_advantage_positive_share', math.nan):.2f}", flush=True)
    return learner, tokenizer, run.state


def compare(tables: dict[str, pd.DataFrame], arm: str, control: str, draws: np.ndarray) -> dict[str, dict]:
    """Paired-by-task differences `arm − control` of each rate, with their bootstrap intervals."""
    out = {}
    for short, column in RATES.items():
        diff = tables[arm][column].to_numpy() - tables[control][column].to_numpy()
        low, high = interval(diff[draws].mean(axis=1))
        out[short] = {"diff": float(diff.mean()), "ci": [low, high]}
    return out


def result_line(arm: str, row: dict) -> str:
    base = row["vs_base"]
    fields = [f"halluc={row['halluc']:.4f}", f"halluc_diff={base['halluc']['diff']:+.4f}",
              "halluc_ci={:+.4f},{:+.4f}".format(*base["halluc"]["ci"]),
              f"pass={row['pass']:.4f}", f"pass_diff={base['pass']['diff']:+.4f}",
              "pass_ci={:+.4f},{:+.4f}".format(*base["pass"]["ci"]),
              f"no_code={row['no_code']:.4f}", f"syntax={row['syntax']:.4f}", f"tasks={row['tasks']}", f"n={row['n']}",
              f"no_code_ci={base['no_code']['ci'][0]:+.4f},{base['no_code']['ci'][1]:+.4f}",
              f"greedy_pass={row['greedy_pass']:.4f}", f"greedy_halluc={row['greedy_halluc']:.4f}",
              f"repair_at_1={row['repair_at_1']:.4f}", f"ttc_km={row.get('ttc_km_mean', math.nan):.3f}",
              f"train_s={row['wall_s'].get('train', 0):.0f}", f"eval_s={row['wall_s']['evaluate']:.0f}"]
    return f"RESULT learning {arm} " + " ".join(fields)


def run(size: str, arms: list[str], out: Path, params: str, overrides: list[str] = ()) -> dict:
    cfg = load_params(params, profile=f"bench_{size}", overrides=overrides)
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    t0 = time.perf_counter()
    summary = prepare(cfg.data, cfg.sandbox, out / "tasks")
    wall["prepare"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_dir = materialise(cfg.model, out / "model")
    wall["model"] = time.perf_counter() - t0
    train_tasks, eval_tasks = read_tasks(out / "tasks" / "train.jsonl"), read_tasks(out / "tasks" / "eval.jsonl")
    print(f"learning bench ({size}): {summary['train']} training tasks, {summary['eval']} held-out tasks × "
          f"{cfg.eval.samples_per_task} samples; arms {', '.join(arms)}", flush=True)

    tables: dict[str, pd.DataFrame] = {}
    rows: dict[str, dict] = {}
    histories: dict[str, pd.DataFrame] = {}
    logs: dict[str, pd.DataFrame] = {}
    result = {"size": size, "profile": cfg.profile, "overrides": list(overrides), "arms": arms, "primary_comparison": "each trained arm against the base",
              "train_tasks": summary["train"], "eval_tasks": summary["eval"], "wall_s": wall,
              "config": {"train": cfg.train.model_dump(), "rollout": cfg.rollout.model_dump(), "eval": cfg.eval.model_dump(),
                         "reward": cfg.reward.model_dump(), "model": cfg.model.source},
              "arm": rows}
    with Sandbox(cfg.sandbox) as sandbox:
        for arm in arms:
            timing: dict[str, float] = {}
            extra: dict = {}
            if arm == "base":
                model, tokenizer = load_policy(model_dir, cfg.model)
            else:
                t0 = time.perf_counter()
                learner, tokenizer, state = train_arm(arm, cfg, model_dir, train_tasks, sandbox)
                timing["train"] = time.perf_counter() - t0
                model = learner.sampler()
                histories[arm], logs[arm] = pd.DataFrame(state.history), pd.DataFrame(state.samples_log)
                ttc = time_to_correction(logs[arm], horizon=cfg.train.iterations)
                extra = {"ttc_km_mean": ttc["km_mean"], "ttc_censored_share": ttc["censored_share"],
                         "history": state.history, "updates": state.updates}
            t0 = time.perf_counter()
            tables[arm], metrics = evaluate(model, tokenizer, eval_tasks, sandbox, cfg, resolve_style(cfg.model.prompt_style, tokenizer), arm)
            timing["evaluate"] = time.perf_counter() - t0
            del model
            rows[arm] = {**{short: float(tables[arm][column].mean()) for short, column in RATES.items()},
                         "tasks": len(tables[arm]), "n": metrics[f"{SAMPLED}samples"],
                         "greedy_pass": metrics.get(f"{GREEDY}pass_at_1", math.nan),
                         "greedy_halluc": metrics.get(f"{GREEDY}hallucination_rate", math.nan),
                         "repair_at_1": metrics.get(f"{GREEDY}repair_at_1", math.nan), "wall_s": timing,
                         "eval_metrics": metrics, **extra}
            _finish(rows, tables, arm, histories, logs, cfg, out, result)
    result["wall_s"]["total"] = sum(wall.values()) + sum(sum(r["wall_s"].values()) for r in rows.values())
    _write(out, result)
    return result


def _finish(rows: dict, tables: dict, arm: str, histories: dict, logs: dict, cfg: Config, out: Path, result: dict) -> None:
    """Compare the arm just evaluated, print its RESULT line, and rewrite the JSON and plots, so a run
    stopped part-way keeps every arm it finished."""
    tasks = sorted(tables["base"].index)
    for name, table in tables.items():
        if sorted(table.index) != tasks:
            raise CosmoCoreError(f"{name} was evaluated on other held-out tasks than the base: the comparison would not be paired")
    tables.update({name: table.loc[tasks] for name, table in tables.items()})
    draws = resample_indices(len(tasks))
    row = rows[arm]
    row["vs_base"] = compare(tables, arm, "base", draws)
    if CONTROL in tables and arm not in ("base", CONTROL):
        row[f"vs_{CONTROL}"] = compare(tables, arm, CONTROL, draws)
    base = rows["base"]
    row["mde_halluc"] = minimum_detectable_effect(row["n"], base["halluc"])
    row["mde_pass"] = minimum_detectable_effect(row["n"], base["pass"], direction="increase")
    print(result_line(arm, row), flush=True)
    estimates = {name: {column: Estimate(float(t[column].mean()), t[column].to_numpy()[draws].mean(axis=1))
                        for column in ("pass_at_1", "hallucination_rate")} for name, t in tables.items()}
    plot_heldout(estimates, out / "heldout.png")
    if histories:
        plot_learning_curves(histories, {"iterations": {a: ttc_pairs_by_task(log) for a, log in logs.items()}},
                             {"iterations": cfg.train.iterations}, out / "curves.png")
    _write(out, result)


def _write(out: Path, result: dict) -> None:
    write_text(out / "learning.json", json.dumps(result, indent=1, default=float) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cosmocore bench learning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="cpu", help="the bench_<size> profile of params.yaml")
    parser.add_argument("--arms", type=parse_arms, default=list(ARMS), help=f"comma-separated (default: {','.join(ARMS)})")
    parser.add_argument("--out", type=Path, help="output folder (default: data/bench/learning-<size>)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a knob of the size's profile, e.g. --set train.lora=true --set train.lr=2e-4")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging("%(name)s %(levelname)s %(message)s")  # as `cosmocore bench` does, for `python -m` too
    start = time.perf_counter()
    result = run(args.size, args.arms, args.out or Path(f"data/bench/learning-{args.size}"), args.params, args.set)
    print(f"learning bench: {time.perf_counter() - start:.0f} s in all; JSON and plots in {args.out or f'data/bench/learning-{args.size}'}")
    for arm, row in result["arm"].items():
        if arm != "base":
            ci = row["vs_base"]["halluc"]["ci"]
            print(f"{arm}: held-out hallucination {row['halluc']:.3f} vs base {result['arm']['base']['halluc']:.3f} "
                  f"(difference 95% CI {ci[0]:+.3f}..{ci[1]:+.3f}; smallest detectable drop {row['mde_halluc']:.3f})")


if __name__ == "__main__":
    main()
