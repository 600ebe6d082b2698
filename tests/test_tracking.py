"""MLflow tracking: every stage of one pipeline run lands under one parent run, keyed by the run's key or
its configuration; a store that cannot be reached stops a stage at once."""

import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cosmocore.errors import CosmoCoreError
from flows.tracking import RUN_KEY, Tracker, config_fingerprint, set_parent_status, tag_parent


def test_stages_of_one_configuration_share_one_parent(tmp_path, monkeypatch, config):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "train.json").write_text('{"lr": 0.1}')
    for stage, tags in [("prepare", {}), ("train", {"variant": "cosmocore", "seed": 0}), ("evaluate", {"policy": "base"})]:
        with Tracker(tmp_path / "config", config.tracking, stage, "smoke", tags=tags) as tracker:
            tracker.log_metrics({"x": 1.0, "nested": {"y": 2}})
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[config.tracking.experiment])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1 and parents["tags.cosmocore.stage"].iloc[0] == "pipeline"
    children = runs[runs["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
    assert sorted(children["tags.cosmocore.stage"]) == ["evaluate", "prepare", "train"]
    assert children["metrics.nested.y"].tolist() == [2.0, 2.0, 2.0]

    (tmp_path / "config" / "train.json").write_text('{"lr": 0.2}')  # a new configuration: a new parent
    Tracker(tmp_path / "config", config.tracking, "train", "smoke").finish()
    runs = mlflow.search_runs(experiment_names=[config.tracking.experiment])
    assert runs["tags.mlflow.parentRunId"].isna().sum() == 2


def test_a_run_key_gives_each_pipeline_run_its_own_parent(tmp_path, monkeypatch, config):
    """COSMOCORE_RUN_KEY (a DVC experiment's name) keys the parent, tagged with it, whatever the config;
    the Prefect flow then finds that parent to tag it or mark it failed."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "train.json").write_text('{"lr": 0.1}')

    def parent(key: str | None) -> str:
        if key is None:
            monkeypatch.delenv(RUN_KEY, raising=False)
        else:
            monkeypatch.setenv(RUN_KEY, key)
        with Tracker(tmp_path / "config", config.tracking, "train", "smoke") as tracker:
            return tracker.parent_id

    first, other, again, unkeyed = parent("exp-a"), parent("exp-b"), parent("exp-a"), parent(None)
    assert first == again and len({first, other, unkeyed}) == 3
    client = MlflowClient(uri)
    tags = client.get_run(first).data.tags
    assert tags["cosmocore.pipeline"] == tags["cosmocore.dvc_experiment"] == "exp-a"
    assert client.get_run(unkeyed).data.tags["cosmocore.pipeline"] == config_fingerprint(tmp_path / "config")
    assert "cosmocore.dvc_experiment" not in client.get_run(unkeyed).data.tags
    experiment = config.tracking.experiment
    assert client.get_experiment_by_name(experiment).tags["mlflow.experimentKind"] == "custom_model_development"

    assert tag_parent(uri, experiment, "exp-b", {"prefect.flow_run_id": "1234"}) == other
    assert client.get_run(other).data.tags["prefect.flow_run_id"] == "1234"
    assert tag_parent(uri, experiment, "no-such-run", {"x": "y"}) is None
    set_parent_status(uri, experiment, "exp-b", "FAILED")
    assert client.get_run(other).info.status == "FAILED" and client.get_run(first).info.status == "FINISHED"


def test_an_unreachable_store_stops_a_stage_in_seconds_naming_the_fix(tmp_path, monkeypatch, config):
    from tests.servers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(CosmoCoreError, match=r"cannot be reached.*`mlflow server .*MLFLOW_TRACKING_URI"):
        Tracker(tmp_path, config.tracking, "prepare", "smoke")
    assert time.monotonic() - start < 10  # MLflow's own retries would take minutes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no' / 'such' / 'mlruns.db'}")
    with pytest.raises(CosmoCoreError, match=r"needs the folder .*/no/such, which does not exist"):
        Tracker(tmp_path, config.tracking, "prepare", "smoke")
