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
from pathlib import Path

import pytest

from flows.pipeline import assignments, hydra_value, set_params
from tests.conftest import REPO, outer_timeout
from tests.servers import free_port, prefect_server, prefect_worker
from tests.test_pipeline import _run, smoke_checkout

# Both runs: one variant each, no self-repair and no output-prediction evaluation, HumanEval only: minutes, not ten.
QUICK = ["data.bigcodebench=false", "eval.repair_rounds=0", "eval.repair_k=[]", "alignment.eval_tasks=0"]

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
    """A smoke checkout under /tmp with a Prefect server, a process worker and every deployment of flows/deploy.py."""
    scratch = Path(tempfile.mkdtemp(prefix="cosmocore-service-", dir="/tmp"))
    try:
        repo, env = smoke_checkout(scratch)
        (repo / "data").mkdir()  # the checkout's own data/, which no run may touch
        shutil.copy(REPO / "data/README.md", repo / "data/README.md")
        _run(["git", "add", "data/README.md"], repo, env)
        _run(["git", "commit", "-qm", "data/README.md"], repo, env)
        # The store as a user who ran the pipeline before has it: two first uses of a fresh sqlite store at
        # once collide in MLflow's schema migration, and in creating the experiment.
        _run([sys.executable, "-c", "import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).create_experiment('cosmocore', "
              "artifact_location=sys.argv[2])", env["MLFLOW_TRACKING_URI"], (repo / "mlartifacts").as_uri()], repo, env)
        with prefect_server(scratch / "prefect", env) as server, prefect_worker(server, "cosmocore"):
            deployed = _run([sys.executable, "-m", "flows.deploy"], repo, server.env, timeout=300)
            yield repo, server, deployed.stdout
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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

    repo, server, deployed = service
    assert all(name in deployed for name in ("cosmocore-pipeline/nightly", "cosmocore-pipeline/ablation",
                                             "cosmocore-learning-bench/weekly", "prefect worker start --pool cosmocore"))
    deployments = _api(server, "POST", "/deployments/filter", {})
    assert {d["name"]: [s["schedule"]["cron"] for s in d["schedules"]] for d in deployments} == {
        "nightly": ["0 3 * * *"], "ablation": ["0 3 * * 6"], "weekly": ["0 3 * * 0"]}
    form = next(d for d in deployments if d["name"] == "nightly")["parameter_openapi_schema"]["properties"]
    assert form["variants"]["description"].startswith("the variants trained") and form["seeds"]["anyOf"][0]["items"]["type"] == "integer"

    data, status = _snapshot(repo / "data"), _run(["git", "status", "--porcelain"], repo, server.env).stdout
    assert data == {"README.md": hashlib.sha256((REPO / "data/README.md").read_bytes()).hexdigest()} and status == ""
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
    names = {i: re.search(r"# CosmoCore experiment `(cc-[a-z0-9-]+)`", tables[i]).group(1) for i in ids}
    for run_id, policy in zip(ids, ("grpo-s0", "on_policy-s0")):
        assert re.search(r"^\| base \| [0-9.]+ \|", tables[run_id], re.MULTILINE) and f"| {policy} |" in tables[run_id]
        assert "parent run `" in tables[run_id] and "| evaluate `" in tables[run_id]  # sqlite store: run ids, no links

    experiments = _experiments(repo, server.env)
    a_params, b_params = experiments[names[ids[0]]], experiments[names[ids[1]]]
    assert a_params["profile"] == b_params["profile"] == "smoke"
    assert a_params["study"]["variants"] == ["grpo"] and b_params["study"]["variants"] == ["on_policy"]
    assert a_params["profiles"]["smoke"]["train"]["lr"] == 0.001 and b_params["profiles"]["smoke"]["train"]["lr"] == 0.002

    mlflow.set_tracking_uri(server.env["MLFLOW_TRACKING_URI"])
    runs_table = mlflow.search_runs(experiment_names=["cosmocore"])
    for run_id in ids:
        name = names[run_id]
        parents = runs_table[(runs_table["tags.cosmocore.dvc_experiment"] == name) & runs_table["tags.mlflow.parentRunId"].isna()]
        assert len(parents) == 1 and parents["tags.dvc.experiment"].iloc[0] == name
        commit = _run(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}"], repo, server.env).stdout.strip()
        assert parents["tags.dvc.commit"].iloc[0] == commit and f"DVC commit `{commit}`" in tables[run_id]
        assert (runs_table["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]).sum() >= 5  # every stage that ran

    assert _snapshot(repo / "data") == data  # no run wrote into the checkout
    assert _run(["git", "status", "--porcelain"], repo, server.env).stdout == status



@pytest.mark.slow
def test_a_run_that_fails_halfway_ends_failed_with_the_end_of_dvc_output(service):
    import mlflow

    repo, server, _ = service
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
    assert f"dvc exp run {name} failed (exit status" in log and f"model.source='{no_model}': cannot load it as a local folder" in log
    mlflow.set_tracking_uri(server.env["MLFLOW_TRACKING_URI"])
    parents = mlflow.search_runs(experiment_names=["cosmocore"], filter_string=f"tags.`cosmocore.dvc_experiment` = '{name}' "
                                 "and tags.`cosmocore.stage` = 'pipeline'")
    assert parents["status"].tolist() == ["FAILED"]
    assert name not in _run(["git", "for-each-ref", "refs/exps"], repo, server.env).stdout

@pytest.mark.slow
def test_the_learning_bench_deployment_attaches_its_result_lines(service):
    repo, server, _ = service
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
