"""MLflow tracking for the flows (the library itself never imports MLflow).

One parent run per pipeline run, so every stage of one `dvc repro`, and every variant and seed of one
ablation study, lands under the same parent as a nested run. The parent is keyed by `COSMOCORE_RUN_KEY`
when it is set (the Prefect pipeline flow sets it to the DVC experiment's name for every run it starts),
else by the hash of the resolved config. Runs are addressed by id through `MlflowClient`, never through
MLflow's thread-local active run, so Prefect tasks on other threads log to the right place.

The tracking store is the repository's sqlite database by default, or any other: with an `mlflow server`
(`MLFLOW_TRACKING_URI=http://host:port`) artifacts and models go through the server, which keeps them
where its `--artifacts-destination` says. `check_reachable` stops a stage in seconds when the store cannot
be used: MLflow's client retries a refused connection for about 4 minutes (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`,
7), right for a blip in the middle of a run, which it keeps, but not for a server that is not there.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from cosmocore.config import TrackingConfig
from cosmocore.errors import CosmoCoreError

REPO = Path(__file__).resolve().parent.parent
RUN_KEY = "COSMOCORE_RUN_KEY"
# The experiment's kind (model training, not GenAI) and a note the UI shows as its description. The MLflow 3.18
# UI still opens on its GenAI view unless the address says `?workflowType=machine_learning` (`flows.pipeline.mlflow_links`
# adds it), and keeps the runs table's columns in the browser: no tag chooses them.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "CosmoCore pipeline runs, one parent per pipeline run. To compare the policies, filter on "
                           "tags.cosmocore.stage = 'evaluate' and show the columns pass_at_1, hallucination_rate and "
                           "ttc_km_mean (time to correction in iterations, lower is better), grouped by params.variant.",
}
REACH_TIMEOUT_S = 5.0
FIX = ("or unset MLFLOW_TRACKING_URI (and tracking.tracking_uri in params.yaml) to use the repository's sqlite "
       "database, or point them at a store that works")


def tracking_uri(cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or f"sqlite:///{REPO / 'mlruns.db'}"


def config_fingerprint(config_dir: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(config_dir).glob("*.json")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def _sqlite_file(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///").split("?")[0])


def check_reachable(uri: str) -> None:
    """Raise `CosmoCoreError`, naming the fix, when the tracking store at `uri` cannot be used: an http(s)
    server that does not answer MLflow's API within `REACH_TIMEOUT_S`, or a sqlite or file store whose
    folder is missing or not writable. Other stores (databricks, postgresql...) are left to MLflow."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:  # one plain request, not MLflow's client and its retries
            urllib.request.urlopen(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
                                   timeout=REACH_TIMEOUT_S).close()
            return
        except urllib.error.HTTPError as error:
            if error.code in (401, 403):  # it answers; credentials are MLflow's client's business
                return
            problem = f"answers HTTP {error.code} to MLflow's API: is it an MLflow tracking server?"
        except (urllib.error.URLError, OSError) as error:  # refused, unknown host, timed out
            problem = f"cannot be reached ({getattr(error, 'reason', error)})"
        port = f" --port {parsed.port}" if parsed.port else ""
        raise CosmoCoreError(f"MLflow tracking server {uri} {problem}: start it (`mlflow server --backend-store-uri "
                             f"sqlite:///mlflow.db --artifacts-destination ./mlartifacts{port}`) {FIX}")
    if parsed.scheme == "sqlite":
        path = _sqlite_file(uri)
        if not path.name:  # `sqlite://`: in memory
            return
        folder = path.parent
    elif parsed.scheme in ("file", ""):
        path = Path(parsed.path if parsed.scheme else uri)
        folder = path if path.is_dir() else path.parent
    else:
        return
    if not folder.is_dir():
        raise CosmoCoreError(f"the MLflow store {uri} needs the folder {folder}, which does not exist: create it {FIX}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CosmoCoreError(f"the MLflow store {uri} is not writable here: fix the permissions of {path} {FIX}")


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`, created (with `EXPERIMENT_TAGS`) when missing; a
    sqlite store keeps its artifacts beside its database (the repository's: mlartifacts/), a server its own.
    Runs started together may both create it: the second finds the first's."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = (_sqlite_file(uri).resolve().parent / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parents(client, experiment_id: str, key: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`cosmocore.pipeline` = '{key}' and tags.`cosmocore.stage` = 'pipeline'",
        max_results=1,
    )


def _find_parent(uri: str, experiment: str, key: str):
    """A client for `uri` and the id of the parent run keyed `key` in `experiment` (None if absent)."""
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    parents = _parents(client, found.experiment_id, key) if found is not None else []
    return client, parents[0].info.run_id if parents else None


def tag_parent(uri: str, experiment: str, key: str, tags: dict[str, str]) -> str | None:
    """Set `tags` on the parent run keyed `key` in `experiment`; its run id, or None when there is none yet."""
    client, run_id = _find_parent(uri, experiment, key)
    if run_id:
        for name, value in tags.items():
            client.set_tag(run_id, name, str(value))
    return run_id


def set_parent_status(uri: str, experiment: str, key: str, status: str) -> None:
    """Mark the parent run keyed `key` in `experiment` with a run status (FINISHED, FAILED, KILLED...): a
    pipeline run that fails halfway marks its parent FAILED. Nothing happens when there is no parent."""
    client, run_id = _find_parent(uri, experiment, key)
    if run_id:
        client.set_terminated(run_id, status=status)


class Tracker:
    """A nested MLflow run for one stage (or one variant and seed), logged to by run id."""

    def __init__(self, config_dir: str | os.PathLike, cfg: TrackingConfig, stage: str, profile: str, tags: dict | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(cfg)
        check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        self.experiment_id = ensure_experiment(uri, cfg.experiment)
        run_key = os.environ.get(RUN_KEY)
        key = run_key or config_fingerprint(config_dir)
        parents = _parents(self.client, self.experiment_id, key)
        if parents:
            self.parent_id = parents[0].info.run_id
        else:
            parent = self.client.create_run(
                self.experiment_id,
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
        self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
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
