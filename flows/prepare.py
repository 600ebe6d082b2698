"""The prepare stage: HumanEval and BigCodeBench tasks, filtered, split, validated and written.

    python -m flows.prepare
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from cosmocore.config import DataConfig, SandboxConfig, TrackingConfig, load_section
from cosmocore.data.datasets import prepare
from cosmocore.files import write_json
from flows.common import CONFIG_DIR, run_main
from flows.tracking import Tracker

OUT = Path("data/prepared")


@flow(name="cosmocore-prepare", log_prints=True)
def prepare_flow(out_dir: str = str(OUT)) -> dict:
    data_cfg = load_section(CONFIG_DIR, DataConfig)
    profile = (CONFIG_DIR / "profile.json").read_text().strip().strip('"')
    with Tracker(CONFIG_DIR, load_section(CONFIG_DIR, TrackingConfig), "prepare", profile) as tracker:
        summary = prepare(data_cfg, load_section(CONFIG_DIR, SandboxConfig), out_dir)
        write_json(Path(out_dir) / "summary.json", summary)
        tracker.log_params(data_cfg.model_dump())
        tracker.log_metrics({"train_tasks": summary["train"], "eval_tasks": summary["eval"], "invalid_tasks": len(summary["invalid"]),
                             "benchmarks": summary["benchmarks"]})
        tracker.log_artifact(Path(out_dir) / "summary.json")
    per_benchmark = {role: ", ".join(f"{name} {summary['benchmarks'][name][role]}" for name in summary[f"{role}_benchmarks"])
                     for role in ("train", "eval")}
    print(f"prepare: {summary['train']} train ({per_benchmark['train']}) / {summary['eval']} eval ({per_benchmark['eval']}) "
          f"tasks, {len(summary['invalid'])} invalid dropped")
    return summary


def main() -> None:
    run_main(prepare_flow)


if __name__ == "__main__":
    main()
