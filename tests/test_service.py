"""Service mode: the deployments of `flows/deploy.py` on a real `prefect server start` and process worker.

Bad parameters fail a run before any DVC work; a deploy without a server stops in seconds naming the fix;
overrides become DVC set-params that the config reads; and, end to end, two pipeline runs triggered
together become two DVC experiments with their own MLflow parents and results artifacts, the checkout
untouched."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import pandas as pd
import pytest

from cosmocore.data.records import read_tasks
from cosmocore.policy.prompts import program_for, resolve_style
from flows.pipeline import assignments, hydra_value, set_params
from tests import browser
from tests.conftest import REPO, outer_timeout
from tests.servers import PrefectServer, free_port, mlflow_server, prefect_server, prefect_worker
from tests.test_pipeline import _run, smoke_checkout

# Both runs: one variant each, no self-repair and no output-prediction evaluation, HumanEval only: minutes, not ten.
QUICK = ["data.bigcodebench=false", "eval.repair_rounds=0", "eval.repair_k=[]", "alignment.eval_tasks=0"]

LOAD_AND_ANSWER = """
import json, sys
import mlflow
answers = mlflow.pyfunc.load_model(sys.argv[1]).predict(json.load(sys.stdin))
import cosmocore
print(json.dumps({"answers": [a.model_dump() for a in answers], "cosmocore": cosmocore.__file__}))
"""

BAD_RUNS = r"""
import json, sys
from flows.bench import learning_bench_flow
from flows.pipeline import pipeline_flow

cases = [(pipeline_flow, dict(profile="smoke", overrides=["train.lrr=0.1"])),
         (pipeline_flow, dict(profile="smoke", overrides=["train.lr=abc"])),
         (pipeline_flow, dict(profile="smoke", variants=["dreamy"])),
         (pipeline_flow, dict(profile="smoke", seeds=["first"])),
         (learning_bench_flow, dict(size="smoke", arms=["base", "dreamy"])),
         (pipeline_flow, dict(profile="smoke"))]  # valid, with MLFLOW_TRACKING_URI at a closed port
out = []
for flow, parameters in cases:
    state = flow(**parameters, return_state=True)
    error = state.result(raise_on_failure=False)
    out.append([state.type.value, type(error).__name__, str(error)])
print(json.dumps(out))
"""


def test_bad_parameters_and_an_unreachable_mlflow_server_fail_the_run_before_any_dvc_work(tmp_path):
    # No `dvc` on PATH: a run that got past the checks would fail on a missing command instead.
    env = {"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO),
           "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    done = subprocess.run([sys.executable, "-c", BAD_RUNS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (lrr, abc, dreamy, first, arm, mlflow_down) = json.loads(done.stdout.splitlines()[-1])
    assert lrr[:2] == ["FAILED", "ConfigError"] and "unknown key 'profiles.smoke.train.lrr' (known: " in lrr[2] and "lr," in lrr[2]
    assert abc[:2] == ["FAILED", "ConfigError"] and "'train.lr': Input should be a valid number (got 'abc')" in abc[2]
    assert dreamy[:2] == ["FAILED", "ConfigError"] and "'study.variants.0'" in dreamy[2] and "'cosmocore'" in dreamy[2]
    assert first[:2] == ["FAILED", "ParameterTypeError"] and "seeds" in first[2]  # Prefect's check of the flow's signature
    assert arm[:2] == ["FAILED", "CosmoCoreError"] and "unknown arm(s) ['dreamy']: choose base or variants among" in arm[2]
    assert mlflow_down[:2] == ["FAILED", "CosmoCoreError"] and "cannot be reached" in mlflow_down[2] and "mlflow server" in mlflow_down[2]


def test_deploy_without_a_server_stops_in_seconds_naming_the_fix(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path / "prefect-home"), "HOME": str(tmp_path),
           "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.deploy"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no Prefect server answers at PREFECT_API_URL=" in done.stderr
    assert "`prefect server start`" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - start < 30  # Python and Prefect's imports; the check itself gives up after 3 s


def test_overrides_become_set_params_that_the_config_reads(tmp_path):
    """Through DVC's own code for `dvc exp run -S`: the params.yaml it writes resolves to the run's config."""
    from dvc.utils.hydra import apply_overrides

    from cosmocore.config import load_params

    overrides = ["train.lr=1e-5", "sandbox.workers=2", "data.bigcodebench_path=/data/it's here", "eval.k=[1, 2]",
                 "train.lora=false", "study.seeds=[0,1]"]
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    assigned = set_params("smoke", assignments(overrides, ["grpo"], None))
    assert assigned[:2] == ["profile='smoke'", "++profiles.smoke.train.lr=1e-05"] and assigned[-1] == "++study.variants=['grpo']"
    apply_overrides(params, assigned)
    expected = load_params(REPO / "params.yaml", "smoke", assignments(overrides, ["grpo"], None))
    assert load_params(params) == expected
    assert expected.train.lr == 1e-5 and expected.data.bigcodebench_path == "/data/it's here" and expected.model.source == "tiny"
    assert hydra_value({"a": [True, None, "x y"]}) == "{a:[true,null,'x y']}"


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _api(server, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{server.api_url}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or "null")


@pytest.fixture(scope="module")
def service():
    """A smoke checkout under /tmp with an `mlflow server`, a Prefect server, a process worker and every
    deployment of flows/deploy.py; then two pipeline runs triggered together, one variant each. Yields a
    `Service`; the runs' outcome is in `service.runs` (or `service.error`: each test that needs them fails)."""
    scratch = Path(tempfile.mkdtemp(prefix="cosmocore-service-", dir="/tmp"))
    try:
        with mlflow_server(scratch / "mlflow") as mlflow_uri:
            repo, env = smoke_checkout(scratch, {"MLFLOW_TRACKING_URI": mlflow_uri})
            (repo / "data").mkdir()  # the checkout's own data/, which no run may touch
            shutil.copy(REPO / "data/README.md", repo / "data/README.md")
            _run(["git", "add", "data/README.md"], repo, env)
            _run(["git", "commit", "-qm", "data/README.md"], repo, env)
            with prefect_server(scratch / "prefect", env) as server, prefect_worker(server, "cosmocore"):
                deployed = _run([sys.executable, "-m", "flows.deploy"], repo, server.env, timeout=300)
                service = Service(repo, server, mlflow_uri, deployed.stdout, _snapshot(repo / "data"),
                                  _run(["git", "status", "--porcelain"], repo, server.env).stdout)
                try:
                    service.runs = _run_two_together(service)
                except (AssertionError, TimeoutError, subprocess.SubprocessError) as error:
                    service.error = error
                yield service
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class Service:
    repo: Path
    server: PrefectServer
    mlflow_uri: str
    deployed: str  # what `python -m flows.deploy` printed
    data: dict[str, str]  # the checkout's data/ before the runs, file → sha256
    status: str  # `git status --porcelain` before the runs
    runs: dict | None = None  # flow run id → (policy, experiment name, DVC commit, results artifact)
    error: Exception | None = None

    def completed_runs(self) -> dict:
        if self.runs is None:
            pytest.fail(f"the two pipeline runs did not complete: {self.error}")
        return self.runs


def _run_two_together(service: Service) -> dict:
    """Trigger the pipeline deployment twice at the same moment, as operations.md has a user do it, and wait."""
    server, repo = service.server, service.repo
    quick = ["--param", f"overrides={json.dumps(QUICK)}"]
    with outer_timeout(540, "the two pipeline runs did not finish in 9 minutes"):
        a = _trigger(server, repo, ["--param", "profile=smoke", "--param", 'variants=["grpo"]', *quick])
        b = _trigger(server, repo, ["--param", "profile=smoke", "--param", 'variants=["on_policy"]',
                                    "--param", f"overrides={json.dumps([*QUICK, 'train.lr=0.002'])}"])
        ids = [re.search(r"UUID: ([0-9a-f-]{36})", p.communicate(timeout=120)[0]).group(1) for p in (a, b)]
        runs = _wait(server, ids, timeout=520)
    worker_log = (server.folder / "worker.log").read_text()[-4000:]
    assert [runs[i]["state"]["type"] for i in ids] == ["COMPLETED", "COMPLETED"], worker_log
    artifacts = _api(server, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": ids}}})
    tables = {a["flow_run_id"]: a["data"] for a in artifacts if a["key"] == "cosmocore-results"}
    out = {}
    for run_id, policy in zip(ids, ("grpo-s0", "on_policy-s0")):
        name = re.search(r"# CosmoCore experiment `(cc-[a-z0-9-]+)`", tables[run_id]).group(1)
        commit = _run(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}"], repo, server.env).stdout.strip()
        out[run_id] = (policy, name, commit, tables[run_id])
    return out


def _trigger(server, repo: Path, parameters: list[str]) -> subprocess.Popen:
    """`prefect deployment run` as operations.md has it, started without waiting."""
    return subprocess.Popen([sys.executable, "-m", "prefect", "deployment", "run", "cosmocore-pipeline/nightly", *parameters],
                            cwd=repo, env=server.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(server, run_ids: list[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = {run_id: _api(server, "GET", f"/flow_runs/{run_id}") for run_id in run_ids}
        if all(run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for run in runs.values()):
            return runs
        assert time.monotonic() < deadline, {k: r["state"]["type"] for k, r in runs.items()}
        time.sleep(3)


def _experiments(repo: Path, env: dict) -> dict[str, dict]:
    """`dvc exp show --json`: each experiment's name → its params.yaml."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name", "") and str(node["name"]).startswith("cc-") and "data" in node:
                found[node["name"]] = node["data"]["params"]["params.yaml"]["data"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(_run(["dvc", "exp", "show", "--json"], repo, env).stdout))
    return found


@pytest.mark.slow
def test_two_runs_triggered_together_are_two_experiments(service):
    import mlflow

    repo, server, deployed = service.repo, service.server, service.deployed
    assert all(name in deployed for name in ("cosmocore-pipeline/nightly", "cosmocore-pipeline/ablation",
                                             "cosmocore-learning-bench/weekly", "prefect worker start --pool cosmocore"))
    deployments = _api(server, "POST", "/deployments/filter", {})
    assert {d["name"]: [s["schedule"]["cron"] for s in d["schedules"]] for d in deployments} == {
        "nightly": ["0 3 * * *"], "ablation": ["0 3 * * 6"], "weekly": ["0 3 * * 0"]}
    form = next(d for d in deployments if d["name"] == "nightly")["parameter_openapi_schema"]["properties"]
    assert form["variants"]["description"].startswith("the variants trained") and form["seeds"]["anyOf"][0]["items"]["type"] == "integer"
    assert service.data == {"README.md": hashlib.sha256((REPO / "data/README.md").read_bytes()).hexdigest()} and service.status == ""

    runs = service.completed_runs()
    for policy, _, _, table in runs.values():
        assert re.search(r"^\| base \| [0-9.]+ \|", table, re.MULTILINE) and f"| {policy} | " in table
        assert f"[parent run]({service.mlflow_uri}/#/experiments/" in table and "[the policies compared](" in table
        assert f"[evaluate]({service.mlflow_uri}/#/experiments/" in table
    experiments = _experiments(repo, server.env)
    (a_policy, a_name, _, _), (b_policy, b_name, _, _) = runs.values()
    a_params, b_params = experiments[a_name], experiments[b_name]
    assert a_params["profile"] == b_params["profile"] == "smoke"
    assert a_params["study"]["variants"] == ["grpo"] and b_params["study"]["variants"] == ["on_policy"]
    assert a_params["profiles"]["smoke"]["train"]["lr"] == 0.001 and b_params["profiles"]["smoke"]["train"]["lr"] == 0.002

    mlflow.set_tracking_uri(service.mlflow_uri)
    runs_table = mlflow.search_runs(experiment_names=["cosmocore"])
    for policy, name, commit, table in runs.values():
        parents = runs_table[(runs_table["tags.cosmocore.dvc_experiment"] == name) & runs_table["tags.mlflow.parentRunId"].isna()]
        assert len(parents) == 1 and parents["tags.dvc.experiment"].iloc[0] == name
        assert parents["tags.dvc.commit"].iloc[0] == commit and f"DVC commit `{commit}`" in table
        nested = runs_table[runs_table["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
        assert {"train", "evaluate", "report"} <= set(nested["tags.cosmocore.stage"])  # earlier stages: whichever run got there first

    assert _snapshot(repo / "data") == service.data  # no run wrote into the checkout
    assert _run(["git", "status", "--porcelain"], repo, server.env).stdout == service.status


@pytest.mark.slow
def test_every_stage_logs_through_the_mlflow_server_under_its_runs_parent(service):
    from mlflow.tracking import MlflowClient

    runs = service.completed_runs()
    client = MlflowClient(service.mlflow_uri)
    experiment = client.get_experiment_by_name("cosmocore")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # kept by the server, not by the client
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert not (service.repo / "mlartifacts").exists() and not (service.repo / "mlruns.db").exists()
    stages = set()
    for policy, name, _, _ in runs.values():
        parent = client.search_runs([experiment.experiment_id], f"tags.`cosmocore.dvc_experiment` = '{name}'")[0]
        nested = {r.data.tags["cosmocore.stage"] + " " + r.data.tags.get("policy", r.data.params.get("variant", "")): r
                  for r in client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
        stages |= set(nested)
        train = nested[f"train {policy.removesuffix('-s0')}"]
        assert train.data.metrics["train_pass_rate"] >= 0
        assert {a.path for a in client.list_artifacts(train.info.run_id)} >= {"history.csv", "updates.csv"}
        assert client.list_artifacts(nested["report "].info.run_id)  # the report's files, uploaded over HTTP
        evaluated = nested[f"evaluate {policy}"]  # what the runs table compares, with the variant beside it
        assert {"pass_at_1", "hallucination_rate"} <= set(evaluated.data.metrics)
        assert evaluated.data.params["variant"] == evaluated.data.tags["variant"] == policy.removesuffix("-s0")
        ttc = evaluated.data.metrics  # time to correction: logged where some pair was seen
        assert ("ttc_km_mean" in ttc) == (ttc["ttc_n_pairs"] > 0)
    assert {"prepare ", "model ", "evaluate base"} <= stages  # each ran in one of the two experiments


@pytest.mark.slow
def test_the_registered_policy_answers_from_mlflow_alone_as_evaluation_did(service, tmp_path):
    from mlflow.tracking import MlflowClient
    from transformers import AutoTokenizer

    runs = service.completed_runs()
    (_, name, commit, _) = next(run for run in runs.values() if run[0] == "grpo-s0")
    client = MlflowClient(service.mlflow_uri)
    assert {v.name for v in client.search_model_versions()} == {"cosmocore-grpo", "cosmocore-on_policy"}
    version = client.get_model_version("cosmocore-grpo", "1")
    assert client.get_run(version.run_id).data.tags["cosmocore.pipeline"] == name  # keyed by its experiment
    checkout = tmp_path / "experiment"  # the experiment's outputs, from git and DVC's cache, for comparison
    _run(["git", "worktree", "add", "-q", "--detach", str(checkout), commit], service.repo, service.server.env)
    _run(["dvc", "cache", "dir", "--local", str(service.repo / ".dvc/cache")], checkout, service.server.env)
    _run(["dvc", "checkout", "-q", "data/config/model.json", "data/prepared/eval.jsonl", "data/model/base", "data/eval/grpo-s0"], checkout, service.server.env)
    tasks = read_tasks(checkout / "data/prepared/eval.jsonl")
    answered = subprocess.run(  # a fresh process that has only MLflow's URI: no repository, no PYTHONPATH
        [sys.executable, "-c", LOAD_AND_ANSWER, "models:/cosmocore-grpo/1"], input=json.dumps([t.prompt for t in tasks]),
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": service.mlflow_uri},
        capture_output=True, text=True, timeout=600)
    assert answered.returncode == 0, answered.stderr[-3000:]
    result = json.loads(answered.stdout.splitlines()[-1])
    assert Path(result["cosmocore"]).parts[-3] == "code"  # the package that came with the model
    greedy = pd.read_parquet(checkout / "data/eval/grpo-s0/greedy_samples.parquet").set_index("task_id")
    model_cfg = json.loads((checkout / "data/config/model.json").read_text())
    style = resolve_style(model_cfg["prompt_style"], AutoTokenizer.from_pretrained(checkout / "data/model/base"))
    for task, answer in zip(tasks, result["answers"], strict=True):
        assert answer["completion"] == greedy.loc[task.task_id, "text"]
        assert answer["program"] == program_for(task, greedy.loc[task.task_id, "code"], style)
    assert any(answer["completion"] for answer in result["answers"])


@pytest.mark.slow
def test_a_run_that_fails_halfway_ends_failed_with_the_end_of_dvc_output(service):
    import mlflow

    repo, server = service.repo, service.server
    no_model = repo.parent / "no-model"  # valid in the config, refused by the model stage
    no_model.mkdir()
    with outer_timeout(300, "the failing run did not end in 5 minutes"):
        triggered = _run([sys.executable, "-m", "prefect", "deployment", "run", "cosmocore-pipeline/nightly", "--param", "profile=smoke",
                          "--param", 'variants=["grpo"]', "--param", f"overrides={json.dumps([*QUICK, f'model.source={no_model}'])}"],
                         repo, server.env, timeout=120)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", triggered.stdout).group(1)
        assert _wait(server, [run_id], timeout=280)[run_id]["state"]["type"] == "FAILED"
        while "its last lines" not in (log := "\n".join(line["message"] for line in _api(
                server, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}))):
            time.sleep(1)  # the flow run's last logs may reach the server just after its state
    name = re.search(r"--name (cc-[a-z0-9-]+)", log).group(1)
    assert f"dvc exp run {name} failed (exit status" in log and f"{no_model} holds no model (config.json missing): point model.source at a model folder" in log
    mlflow.set_tracking_uri(service.mlflow_uri)
    parents = mlflow.search_runs(experiment_names=["cosmocore"], filter_string=f"tags.`cosmocore.dvc_experiment` = '{name}' "
                                 "and tags.`cosmocore.stage` = 'pipeline'")
    assert parents["status"].tolist() == ["FAILED"]
    assert name not in _run(["git", "for-each-ref", "refs/exps"], repo, server.env).stdout

@pytest.mark.slow
def test_the_learning_bench_deployment_attaches_its_result_lines(service):
    repo, server = service.repo, service.server
    with outer_timeout(300, "the learning bench's smoke run did not finish in 5 minutes"):
        triggered = _run([sys.executable, "-m", "prefect", "deployment", "run", "cosmocore-learning-bench/weekly",
                          "--param", "size=smoke", "--param", 'arms=["base"]', "--param", 'overrides=["eval.repair_rounds=0", "eval.repair_k=[]"]'],
                         repo, server.env, timeout=120)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", triggered.stdout).group(1)
        run = _wait(server, [run_id], timeout=280)[run_id]
    assert run["state"]["type"] == "COMPLETED", (server.folder / "worker.log").read_text()[-4000:]
    artifact = next(a for a in _api(server, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
                    if a["key"] == "cosmocore-learning-bench")
    assert re.search(r"^\| arm \| halluc \| halluc_diff \|", artifact["data"], re.MULTILINE)
    assert re.search(r"^\| base \| [0-9.]+ \| \+0\.0000 \|", artifact["data"], re.MULTILINE)
    out = Path(re.search(r"JSON and plots: `([^`]+)`", artifact["data"]).group(1))
    assert json.loads((out / "learning.json").read_text())["arms"] == ["base"]
    shutil.rmtree(out.parent)


@pytest.mark.slow
def test_the_prefect_ui_shows_the_deployments_their_schedules_and_run_form_and_the_completed_runs(service, tmp_path):
    service.completed_runs()
    ui = service.server.ui_url
    nightly = next(d["id"] for d in _api(service.server, "POST", "/deployments/filter", {}) if d["name"] == "nightly")
    with browser.page(width=1920) as page:  # narrower, the table folds long schedules into "+1"
        page.goto(f"{ui}/deployments")
        for text in ("nightly", "ablation", "weekly", "At 03:00 AM every day", "At 03:00 AM, only on Saturday",
                     "At 03:00 AM, only on Sunday"):
            page.get_by_text(text, exact=True).first.wait_for(timeout=60_000)
        browser.screenshot(page, tmp_path, "prefect-deployments.png")
        page.goto(f"{ui}/deployments/deployment/{nightly}/run")  # the run form: every parameter, described
        for text in ("profile (Optional)", "variants (Optional)", "seeds (Optional)", "overrides (Optional)",
                     "section.key=value over the profile"):
            page.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
        browser.screenshot(page, tmp_path, "prefect-run-form.png")
        page.goto(f"{ui}/runs")
        page.get_by_text("cosmocore-pipeline").first.wait_for(timeout=60_000)
        page.get_by_text("Completed", exact=True).nth(1).wait_for(timeout=60_000)  # the two runs triggered together
        browser.screenshot(page, tmp_path, "prefect-runs.png")


@pytest.mark.slow
def test_the_mlflow_ui_compares_the_smoke_variants_on_hallucination(service, tmp_path):
    from mlflow.tracking import MlflowClient

    service.completed_runs()
    client = MlflowClient(service.mlflow_uri)
    experiment_id = client.get_experiment_by_name("cosmocore").experiment_id
    evaluated = client.search_runs([experiment_id], "tags.`cosmocore.stage` = 'evaluate'")
    assert {run.data.tags["policy"] for run in evaluated} >= {"base", "grpo-s0", "on_policy-s0"}
    runs = quote(json.dumps([run.info.run_id for run in evaluated]))
    with browser.page(width=1600) as page:
        evaluate_runs = urlencode({"workflowType": "machine_learning", "searchFilter": "tags.`cosmocore.stage` = 'evaluate'",
                                   "orderByKey": "metrics.`hallucination_rate`", "orderByAsc": "true"}, quote_via=quote)
        page.goto(f"{service.mlflow_uri}/#/experiments/{experiment_id}/runs?{evaluate_runs}")  # the model-training view
        page.get_by_text("evaluate on_policy-s0", exact=False).first.wait_for(timeout=60_000)
        page.get_by_text("Sort: hallucination_rate", exact=False).wait_for(timeout=60_000)
        browser.screenshot(page, tmp_path, "mlflow-runs.png")
        page.goto(f"{service.mlflow_uri}/#/compare-runs?runs={runs}&experiments={quote(json.dumps([experiment_id]))}"
                  "&workflowType=machine_learning")
        page.get_by_text(f"Comparing {len(evaluated)} Runs", exact=False).wait_for(timeout=60_000)
        text = page.inner_text("body")
        page.get_by_text("hallucination_rate", exact=True).first.scroll_into_view_if_needed()  # the metrics table's row
        browser.screenshot(page, tmp_path, "mlflow-compare.png")
    assert "hallucination_rate" in text and "pass_at_1" in text
    assert all(variant in text for variant in ("base", "grpo", "on_policy"))
