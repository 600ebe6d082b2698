"""End to end against a real `mlflow server` over HTTP: the smoke pipeline (one variant) logs every stage's
params, metrics and artifacts through the server, under a parent keyed by COSMOCORE_RUN_KEY, and registers the
trained policy, which then answers from MLflow alone, in a fresh process, as the evaluate stage's greedy run did."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from cosmocore.data.records import read_tasks
from cosmocore.policy.prompts import program_for, resolve_style
from flows.tracking import RUN_KEY
from tests.test_pipeline import run_smoke

pytestmark = pytest.mark.slow

KEY = "smoke-over-http"
LOAD_AND_ANSWER = """
import json, sys
import mlflow
answers = mlflow.pyfunc.load_model(sys.argv[1]).predict(json.load(sys.stdin))
import cosmocore
print(json.dumps({"answers": [a.model_dump() for a in answers], "cosmocore": cosmocore.__file__}))
"""


@pytest.fixture(scope="module")
def smoke_over_http(mlflow_server_uri):
    scratch = Path(tempfile.mkdtemp(prefix="cosmocore-http-", dir="/tmp"))
    try:
        repo, env, _ = run_smoke(scratch, {"MLFLOW_TRACKING_URI": mlflow_server_uri, RUN_KEY: KEY},
                                 ("-S", "study.variants=[grpo]"))
        yield repo, mlflow_server_uri
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_every_stage_logs_through_the_server_under_the_run_keyed_parent(smoke_over_http):
    from mlflow.tracking import MlflowClient

    repo, uri = smoke_over_http
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cosmocore")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # kept by the server, not by the client
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert not (repo / "mlartifacts").exists() and not (repo / "mlruns.db").exists()
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["cosmocore.dvc_experiment"] == KEY
    nested = {r.data.tags["cosmocore.stage"] + " " + r.data.tags.get("policy", r.data.params.get("variant", "")): r
              for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(nested) == {"prepare ", "model ", "train grpo", "evaluate base", "evaluate grpo-s0", "report "}
    train = nested["train grpo"]
    assert train.data.metrics["train_pass_rate"] >= 0 and train.data.params["variant"] == "grpo"
    assert {a.path for a in client.list_artifacts(train.info.run_id)} >= {"history.csv", "updates.csv"}
    assert client.list_artifacts(nested["report "].info.run_id)  # the report's files, uploaded over HTTP
    for policy in ("base", "grpo-s0"):  # what the runs table compares, with the variant beside it
        evaluated = nested[f"evaluate {policy}"]
        assert {"pass_at_1", "hallucination_rate"} <= set(evaluated.data.metrics)
        assert evaluated.data.params["variant"] == evaluated.data.tags["variant"] == policy.removesuffix("-s0")
    ttc = nested["evaluate grpo-s0"].data.metrics  # time to correction: logged where some pair was seen
    assert ("ttc_km_mean" in ttc) == (ttc["ttc_n_pairs"] > 0)


def test_the_registered_policy_answers_from_mlflow_alone_as_evaluation_did(smoke_over_http, tmp_path):
    from mlflow.tracking import MlflowClient
    from transformers import AutoTokenizer

    repo, uri = smoke_over_http
    version = MlflowClient(uri).get_model_version("cosmocore-grpo", "1")
    assert MlflowClient(uri).get_run(version.run_id).data.tags["cosmocore.stage"] == "train"
    tasks = read_tasks(repo / "data/prepared/eval.jsonl")
    answered = subprocess.run(  # a fresh process that has only MLflow's URI: no repository, no PYTHONPATH
        [sys.executable, "-c", LOAD_AND_ANSWER, "models:/cosmocore-grpo/1"], input=json.dumps([t.prompt for t in tasks]),
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": uri},
        capture_output=True, text=True, timeout=600)
    assert answered.returncode == 0, answered.stderr[-3000:]
    result = json.loads(answered.stdout.splitlines()[-1])
    assert Path(result["cosmocore"]).parts[-3] == "code"  # the package that came with the model
    greedy = pd.read_parquet(repo / "data/eval/grpo-s0/greedy_samples.parquet").set_index("task_id")
    model_cfg = json.loads((repo / "data/config/model.json").read_text())
    style = resolve_style(model_cfg["prompt_style"], AutoTokenizer.from_pretrained(repo / "data/model/base"))
    for task, answer in zip(tasks, result["answers"], strict=True):
        assert answer["completion"] == greedy.loc[task.task_id, "text"]
        assert answer["program"] == program_for(task, greedy.loc[task.task_id, "code"], style)
    assert any(answer["completion"] for answer in result["answers"])
