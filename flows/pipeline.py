"""The whole pipeline as one Prefect flow: every run is a DVC experiment of its own.

A run validates its parameters against the typed config first (a bad one fails the run before any DVC
work), then runs `dvc exp run --temp` in a temporary copy of the checkout, so runs started together
never touch each other's outputs or the checkout's `data/`; DVC still decides what must run (its run
cache restores unchanged stages). The MLflow parent run is keyed by the experiment's name and tagged
with its commit; the held-out table goes to the flow run as a markdown artifact. Deployed by
`python -m flows.deploy`; one run from the shell:

    python -m flows.pipeline [--profile smoke] [--variant grpo ...] [--seed 0 ...] [--set train.lr=1e-5 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from collections import deque
from pathlib import Path
from urllib.parse import quote

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from cosmocore.config import load_params, yaml_value
from flows.common import die_with_parent, run_main
from flows.tracking import RUN_KEY, check_reachable, ensure_experiment, set_parent_status, tag_parent, tracking_uri

REPO = Path(__file__).resolve().parent.parent
HEADLINE = "data/metrics/heldout.json"
MLFLOW_UI = "COSMOCORE_MLFLOW_UI_URL"  # the MLflow UI's address, for links (an http tracking URI is its own)
TAIL_LINES = 60


def assignments(overrides: list[str], variants: list[str] | None, seeds: list[int] | None) -> list[str]:
    """A run's `section.key=value` assignments: `overrides`, then the variants and seeds (when given) as `study.*`."""
    return [*overrides, *([f"study.variants={json.dumps(variants)}"] if variants else []),
            *([f"study.seeds={json.dumps(seeds)}"] if seeds else [])]


def hydra_value(value: object) -> str:
    """A YAML value written in the override grammar of `dvc exp run -S` (Hydra's)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def set_params(profile: str, assignments: list[str]) -> list[str]:
    """`dvc exp run -S` arguments that select `profile` and lay `assignments` (validated `section.key=value`)
    where the config reads them: `study.*` at the top, every other section in the profile, which
    overrides the base sections (`++` adds a key the profile does not set yet)."""
    out = [f"profile={hydra_value(profile)}"]
    for assignment in assignments:
        key, _, text = assignment.partition("=")
        key = key.strip()
        where = key if key.startswith("study.") else f"profiles.{profile}.{key}"
        out.append(f"++{where}={hydra_value(yaml_value(text))}")
    return out


def experiment_name(run_name: str | None, run_id: str | None) -> str:
    """A DVC experiment name (a valid git ref) unique to the flow run."""
    words = re.sub(r"[^a-z0-9]+", "-", (run_name or "run").lower()).strip("-") or "run"
    return f"cc-{words}-{(run_id or os.urandom(4).hex()).replace('-', '')[:8]}"


def run_logged(what: str, command: list[str], cwd: Path, env: dict[str, str], show: tuple[str, ...]) -> list[str]:
    """Run `command` (`what`, in messages), logging the output lines that start with one of `show` as they
    come, and return those; when it fails, log its last lines and raise."""
    log = get_run_logger()
    log.info("running in %s: %s", cwd, " ".join(command))
    shown, tail = [], deque(maxlen=TAIL_LINES)
    with subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent) as process:
        for line in process.stdout:
            tail.append(line := line.rstrip())
            if line.startswith(show):
                shown.append(line)
                log.info("%s", line)
    if process.returncode != 0:
        log.error("%s failed (exit status %d); its last lines:\n%s", what, process.returncode, "\n".join(tail))
        raise RuntimeError(f"{what} failed with exit status {process.returncode}: its last lines are in the log above")
    return shown


def run_experiment(name: str, params: list[str], env: dict[str, str]) -> str:
    """`dvc exp run --temp` in the checkout (waiting while another run holds DVC's lock to set its own up);
    returns the experiment's commit."""
    command = ["dvc", "--wait-for-lock", "exp", "run", "--temp", "--name", name, *(a for p in params for a in ("-S", p))]
    run_logged(f"dvc exp run {name}", command, REPO, env, ("Running stage", "Stage '", "ERROR"))
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.split()
    if len(refs) != 1:
        raise RuntimeError(f"dvc exp run {name} succeeded but git holds {len(refs)} experiment refs of that name")
    return refs[0]


def results_markdown(name: str, commit: str, heldout: dict[str, dict], links: dict[str, str]) -> str:
    """The run's held-out table, one row per policy, with where its MLflow runs are."""
    columns = list(dict.fromkeys(column for metrics in heldout.values() for column in metrics))  # the report's order
    lines = [f"# CosmoCore experiment `{name}`", "", f"DVC commit `{commit}` (`dvc exp show`, `dvc exp apply {name}`); "
             f"MLflow: {links.get('pipeline', 'no parent run found')}" + (f", {links['compare']}" if "compare" in links else ""), "",
             "| policy | " + " | ".join(columns) + " | MLflow |", "|---" * (len(columns) + 2) + "|"]
    for policy, metrics in heldout.items():
        cells = [f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else str(metrics.get(c, "")) for c in columns]
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {links.get(policy, '')} |")
    return "\n".join(lines) + "\n"


def mlflow_links(uri: str, parent_id: str | None) -> dict[str, str]:
    """Markdown links to the parent run, each policy's evaluate run (`pipeline` and the policy names) and the
    MLflow UI's comparison of those evaluate runs (`compare`), on its model-training view; plain run ids where
    no UI address is known (a sqlite store without COSMOCORE_MLFLOW_UI_URL)."""
    if parent_id is None:
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    base = os.environ.get(MLFLOW_UI) or (uri if uri.startswith(("http://", "https://")) else None)
    evaluated = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                   "tags.`cosmocore.stage` = 'evaluate'")
    evaluated = {run.data.tags["policy"]: run.info.run_id for run in evaluated if "policy" in run.data.tags}
    if not base:
        return {"pipeline": f"parent run `{parent_id}`", **{policy: f"evaluate `{run_id}`" for policy, run_id in evaluated.items()}}
    ui, view = base.rstrip("/"), "workflowType=machine_learning"  # MLflow 3.18's UI opens on its GenAI view without it
    runs = quote(json.dumps(sorted(evaluated.values())))
    return {"pipeline": f"[parent run]({ui}/#/experiments/{experiment_id}/runs/{parent_id}?{view})",
            "compare": f"[the policies compared]({ui}/#/compare-runs?runs={runs}&experiments={quote(json.dumps([experiment_id]))}&{view})",
            **{policy: f"[evaluate]({ui}/#/experiments/{experiment_id}/runs/{run_id}?{view})" for policy, run_id in evaluated.items()}}


@flow(name="cosmocore-pipeline", log_prints=True)
def pipeline_flow(profile: str = "default", variants: list[str] | None = None, seeds: list[int] | None = None,
                  overrides: list[str] | None = None) -> dict:
    """Run the DVC pipeline as a DVC experiment of its own and return its held-out metrics per policy.

    Args:
        profile: a profile of params.yaml: default, smoke, ablation...
        variants: the variants trained (study.variants), e.g. ["grpo", "cosmocore"]; empty: params.yaml's
        seeds: the seeds trained (study.seeds), e.g. [0, 1, 2]; empty: params.yaml's
        overrides: section.key=value over the profile, values in YAML, e.g. ["train.lr=1e-5", "train.lora=false"]
    """
    assigned = assignments(list(overrides or []), variants, seeds)
    cfg = load_params(REPO / "params.yaml", profile, assigned)  # a bad parameter fails the run here, before any DVC work
    name = experiment_name(flow_run.get_name(), flow_run.get_id())
    uri = tracking_uri(cfg.tracking)  # resolved here: in the experiment's temporary copy the default store would be a copy
    check_reachable(uri)
    ensure_experiment(uri, cfg.tracking.experiment)  # here, not by two runs' first stages at once
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, RUN_KEY: name}
    try:
        commit = run_experiment(name, set_params(profile, assigned), env)
    except Exception:
        set_parent_status(uri, cfg.tracking.experiment, name, "FAILED")
        raise
    heldout = json.loads(subprocess.run(["git", "show", f"{commit}:{HEADLINE}"], cwd=REPO, capture_output=True,
                                        text=True, check=True).stdout)
    parent_id = tag_parent(uri, cfg.tracking.experiment, name, {"dvc.experiment": name, "dvc.commit": commit})
    create_markdown_artifact(results_markdown(name, commit, heldout, mlflow_links(uri, parent_id)), key="cosmocore-results",
                             description=f"held-out metrics of DVC experiment {name}")
    return {"experiment": name, "commit": commit, "mlflow_parent_run": parent_id, "heldout": heldout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", help="a profile of params.yaml")
    parser.add_argument("--variant", action="append", dest="variants", help="a variant to train (repeat; default: study.variants)")
    parser.add_argument("--seed", action="append", dest="seeds", type=int, help="a seed to train (repeat; default: study.seeds)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.KEY=VALUE",
                        help="override a knob of the profile, e.g. --set train.lr=1e-5")
    args = parser.parse_args()
    run_main(lambda: pipeline_flow(args.profile, args.variants, args.seeds, args.overrides))


if __name__ == "__main__":
    main()
