"""The report stage: read the held-out evaluations of the base model and every trained variant and
seed, and their training logs; write the DVC metrics file, the markdown report with its plots and the
numbers it states (`cosmocore.evaluation.report` computes them), and log the report to MLflow.

    python -m flows.report
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import flow

from cosmocore.config import load_config
from cosmocore.data.records import TRAJECTORY_COLUMNS, read_samples_log, read_table
from cosmocore.evaluation.report import ReportInputs, build_report
from cosmocore.files import write_json
from flows.common import CONFIG_DIR, run_main
from flows.tracking import Tracker

# What `dvc metrics show` lists per policy; every other number is in data/metrics/eval/<policy>.json,
# the report and MLflow.
HEADLINE = ("pass_at_1", "hallucination_rate", "greedy_pass_at_1", "greedy_hallucination_rate", "ttc_km_mean",
            "exec_output_accuracy")


def _rollouts(state_dir: Path) -> pd.DataFrame:
    """All iterations' trajectory tables of one training run, in iteration order."""
    paths = sorted((state_dir / "rollouts").glob("iter_*.parquet"), key=lambda p: int(p.stem.split("_")[1]))
    fix = f"delete the run's state folder {state_dir} and re-run its train stage (`dvc repro`) to start the run afresh"
    return pd.concat([read_table(p, TRAJECTORY_COLUMNS, fix) for p in paths], ignore_index=True) if paths else pd.DataFrame()


def read_inputs(profile: str, policies: list[str], horizon: int, greedy: bool, eval_metrics_root: Path,
                eval_root: Path, runs_root: Path, horizon_updates: int | None = None) -> ReportInputs:
    """Everything the report is made from, read from the evaluate and train stages' outputs; TTC
    horizons in iterations and (when given) in optimizer updates. `greedy`: compare the greedy
    programs, else the sampled ones."""
    decoding = "greedy" if greedy else "sampled"
    trained = [p for p in policies if p != "base"]
    logs = {p: runs_root / p / "samples_log.parquet" for p in trained}
    return ReportInputs(
        profile=profile,
        eval_metrics={p: json.loads((eval_metrics_root / f"{p}.json").read_text()) for p in policies},
        heldout_samples={p: read_table(eval_root / p / f"{decoding}_samples.parquet", TRAJECTORY_COLUMNS,
                                       f"re-run the evaluate stage of {p} (`dvc repro`)") for p in policies},
        histories={p: pd.read_csv(runs_root / p / "history.csv") for p in trained},
        samples_logs={p: read_samples_log(path) for p, path in logs.items() if path.exists()},
        rollouts={p: frame for p in trained if not (frame := _rollouts(runs_root / p / "state")).empty},
        horizon=horizon,
        decoding=decoding,
        horizon_updates=horizon_updates,
    )


@flow(name="cosmocore-report", log_prints=True)
def report_flow(eval_metrics_root: str = "data/metrics/eval", eval_root: str = "data/eval", runs_root: str = "data/runs",
                out_dir: str = "data/report", metrics_path: str = "data/metrics/heldout.json") -> dict:
    cfg = load_config(CONFIG_DIR)
    policies = ["base"] + [f"{v}-s{s}" for v in cfg.study.variants for s in cfg.study.seeds]
    # The sampled programs where there are several per task (the powered comparison), else the greedy ones.
    greedy = cfg.eval.greedy and cfg.eval.samples_per_task == 1
    inputs = read_inputs(cfg.profile, policies, cfg.train.iterations, greedy, Path(eval_metrics_root),
                         Path(eval_root), Path(runs_root), horizon_updates=cfg.train.updates_budget)
    write_json(metrics_path, {p: {k: v for k, v in m.items() if k in HEADLINE}
                              for p, m in inputs.eval_metrics.items()})
    out = Path(out_dir)
    markdown, numbers = build_report(inputs, out)
    (out / "report.md").write_text(markdown)
    write_json(out / "numbers.json", numbers)
    with Tracker(CONFIG_DIR, cfg.tracking, "report", cfg.profile) as tracker:
        for path in [out / "report.md", out / "numbers.json"] + [out / name for name in numbers["plots"]]:
            tracker.log_artifact(path)
    print(markdown)
    return numbers


def main() -> None:
    run_main(report_flow)


if __name__ == "__main__":
    main()
