"""The model stage: materialise the base policy (`model.source`) once, as a DVC-cached folder.

    python -m flows.model
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow

from cosmocore.config import ModelConfig, TrackingConfig, load_section
from cosmocore.policy.models import materialise
from flows.common import CONFIG_DIR, run_main
from flows.tracking import Tracker

OUT = Path("data/model/base")


@flow(name="cosmocore-model", log_prints=True)
def model_flow(out_dir: str = str(OUT)) -> str:
    cfg = load_section(CONFIG_DIR, ModelConfig)
    profile = (CONFIG_DIR / "profile.json").read_text().strip().strip('"')
    shutil.rmtree(out_dir, ignore_errors=True)
    with Tracker(CONFIG_DIR, load_section(CONFIG_DIR, TrackingConfig), "model", profile) as tracker:
        path = materialise(cfg, out_dir)
        tracker.log_params(cfg.model_dump())
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        tracker.log_metrics({"model_bytes": size})
    print(f"model: {cfg.source} materialised in {path} ({size / 2**20:.0f} MiB)")
    return str(path)


def main() -> None:
    run_main(model_flow)


if __name__ == "__main__":
    main()
