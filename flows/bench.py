"""The learning benchmark as a Prefect flow: `cosmocore bench learning` in a fresh folder of its own, its
RESULT lines attached to the flow run as a markdown table. Deployed by `python -m flows.deploy`.

The benchmark writes its JSON and plots to `<folder>/out`; the folder is kept and named in the artifact."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from cosmocore.bench.learning import ARMS, SIZES
from cosmocore.bench.learning import parse_arms  # the bench's own check of --arms
from cosmocore.config import load_params
from cosmocore.errors import CosmoCoreError
from flows.pipeline import REPO, run_logged

Size = Literal[SIZES]


def results_markdown(lines: list[str], folder: Path) -> str:
    """`RESULT learning ARM key=value ...` lines as a table, one row per arm."""
    rows = [(line.split()[2], dict(field.split("=", 1) for field in line.split()[3:])) for line in lines]
    columns = list(rows[0][1]) if rows else []
    table = ["| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table += [f"| {arm} | " + " | ".join(fields.get(c, "") for c in columns) + " |" for arm, fields in rows]
    return "\n".join(["# Learning benchmark", "", f"JSON and plots: `{folder}`", "", *table]) + "\n"


@flow(name="cosmocore-learning-bench", log_prints=True)
def learning_bench_flow(size: Size = "cpu", arms: list[str] = list(ARMS), overrides: list[str] | None = None) -> list[str]:
    """Run `cosmocore bench learning` and return its RESULT lines.

    Args:
        size: the bench_<size> profile of params.yaml: smoke (minutes), cpu (hours on 2 cores), gpu
        arms: base and variants to train and compare, e.g. ["base", "on_policy", "grpo", "cosmocore"]
        overrides: section.key=value over the size's profile, values in YAML, e.g. ["train.lr=2e-5"]
    """
    overrides = list(overrides or [])
    try:
        parse_arms(",".join(arms))
    except argparse.ArgumentTypeError as error:
        raise CosmoCoreError(str(error)) from None
    load_params(REPO / "params.yaml", f"bench_{size}", overrides)  # a bad override fails here, before the bench starts
    folder = Path(tempfile.mkdtemp(prefix=f"cosmocore-learning-{size}-{flow_run.get_name()}-"))
    command = [sys.executable, "-m", "cosmocore.cli", "bench", "learning", "--size", size, "--arms", ",".join(arms),
               "--params", str(REPO / "params.yaml"), "--out", str(folder / "out"), *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results = run_logged("cosmocore bench learning", command, folder, env, ("RESULT learning ",))
    create_markdown_artifact(results_markdown(results, folder / "out"), key="cosmocore-learning-bench",
                             description=f"learning benchmark, size {size}")
    return results
