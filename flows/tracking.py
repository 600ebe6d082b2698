"""MLflow tracking for the flows (the library itself never imports MLflow).

One parent run per pipeline configuration (the hash of the resolved config), so every stage of one
`dvc repro`, and every variant and seed of one ablation study, lands under the same parent as a nested
run. Runs are addressed by id through `MlflowClient`, never through MLflow's thread-local active run,
so Prefect tasks on other threads log to the right place. With `COSMOCORE_RUN_KEY` set (the Prefect
pipeline flow sets it to the DVC experiment's name) the parent is keyed by it instead.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from cosmocore.config import TrackingConfig
from cosmocore.errors import CosmoCoreError

REPO = Path(__file__).resolve().parent.parent
RUN_KEY = "COSMOCORE_RUN_KEY"


def tracking_uri(cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or f"sqlite:///{REPO / 'mlruns.db'}"


def config_fingerprint(config_dir: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(config_dir).glob("*.json")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def check_reachable(uri: str) -> None:
    """Raise `CosmoCoreError`, naming the fix, when the HTTP tracking server at `uri` does not answer in 5 s."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
    except (urllib.error.URLError, OSError) as error:
        raise CosmoCoreError(f"MLflow tracking server {uri} cannot be reached ({getattr(error, 'reason', error)}): start it "
                             "(`mlflow server --port PORT`) or point MLFLOW_TRACKING_URI at one that answers") from None


def _parent(uri: str, experiment: str, key: str):
    """A client for `uri` and the id of the parent run keyed `key` in `experiment` (None if absent)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    parents = client.search_runs([found.experiment_id], filter_string=f"tags.`cosmocore.pipeline` = '{key}' and "
                                 "tags.`cosmocore.stage` = 'pipeline'", max_results=1) if found else []
    return client, parents[0].info.run_id if parents else None


def tag_parent(uri: str, experiment: str, key: str, tags: dict[str, str]) -> str | None:
    """Set `tags` on the parent run keyed `key`; its run id, or None when there is none."""
    client, run_id = _parent(uri, experiment, key)
    for name, value in tags.items() if run_id else ():
        client.set_tag(run_id, name, str(value))
    return run_id


def set_parent_status(uri: str, experiment: str, key: str, status: str) -> None:
    """Mark the parent run keyed `key` FINISHED, FAILED, KILLED...; nothing when there is none."""
    client, run_id = _parent(uri, experiment, key)
    if run_id:
        client.set_terminated(run_id, status=status)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Tracker:
    """A nested MLflow run for one stage (or one variant and seed), logged to by run id."""

    def __init__(self, config_dir: str | os.PathLike, cfg: TrackingConfig, stage: str, profile: str, tags: dict | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(cfg)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            artifacts = (REPO / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
            experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run_key = os.environ.get(RUN_KEY)
        key = run_key or config_fingerprint(config_dir)
        parents = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`cosmocore.pipeline` = '{key}' and tags.`cosmocore.stage` = 'pipeline'",
            max_results=1,
        )
        if parents:
            self.parent_id = parents[0].info.run_id
        else:
            parent = self.client.create_run(
                experiment_id,
                run_name=f"pipeline {profile} {key}",
                tags={"cosmocore.pipeline": key, "cosmocore.stage": "pipeline", "cosmocore.profile": profile,
                      "cosmocore.commit": _git_commit(), **({"cosmocore.dvc_experiment": run_key} if run_key else {})},
            )
            self.parent_id = parent.info.run_id
            self.client.set_terminated(self.parent_id)
        all_tags = {
            "mlflow.parentRunId": self.parent_id,
            "cosmocore.stage": stage,
            "cosmocore.pipeline": key,
            "cosmocore.profile": profile,
            "cosmocore.commit": _git_commit(),
            **{k: str(v) for k, v in (tags or {}).items()},
        }
        name = stage + "".join(f" {v}" for k, v in (tags or {}).items())
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id
        self.uri = uri

    def log_params(self, params: dict, prefix: str = "") -> None:
        for key, value in params.items():
            if isinstance(value, dict):
                self.log_params(value, f"{prefix}{key}.")
            else:
                self.client.log_param(self.run_id, f"{prefix}{key}", str(value)[:500])

    def log_metrics(self, metrics: dict, step: int | None = None, prefix: str = "") -> None:
        for key, value in metrics.items():
            if isinstance(value, dict):
                self.log_metrics(value, step, f"{prefix}{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.client.log_metric(self.run_id, f"{prefix}{key}", float(value), step=step or 0)

    def log_artifact(self, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")
