"""End to end: `dvc exp run -S profile=smoke` in a temporary git repository, the real pipeline on the
tiny model; then the MLflow database and DVC's view of the results, and that nothing re-runs."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m "not slow"` skips them

SHARED_BCB = REPO.parent / "shared" / "data" / "bigcodebench"


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def venv_beside(folder: Path) -> Path:
    """A virtual environment in `folder` that sees this one's packages (a `.pth` adds its site folders)
    and has its own `dvc` and `cosmocore` commands: what a user with a venv under /tmp has."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_dir = next((venv / "lib").glob("python3*/site-packages"))
    (site_dir / "outer.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))
    for command in ("dvc", "cosmocore"):
        script = (Path(sys.executable).parent / command).read_text().split("\n", 1)[1]
        (venv / "bin" / command).write_text(f"#!{venv / 'bin' / 'python'}\n{script}")
        (venv / "bin" / command).chmod(0o755)
    return venv


@pytest.fixture(scope="module")
def smoke_repo():
    """The repository cloned under /tmp, run with a virtual environment under /tmp (the sandbox hides the
    host's /tmp from samples but must show the interpreter)."""
    scratch = Path(tempfile.mkdtemp(prefix="cosmocore-smoke-", dir="/tmp"))
    yield run_smoke(scratch)
    shutil.rmtree(scratch, ignore_errors=True)


def smoke_checkout(scratch: Path, extra_env: dict[str, str] | None = None) -> tuple[Path, dict]:
    """This checkout's files (not data/) committed in a fresh git repository `scratch/cosmocore`, and the
    environment to run in it: a virtual environment under `scratch`, its own PREFECT_HOME and a sqlite
    MLflow store beside the repository, with `extra_env` over it."""
    repo, venv = scratch / "cosmocore", venv_beside(scratch)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if name.startswith("data/") or not (REPO / name).is_file():
            continue
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # the code in the repository, not this checkout's
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "PREFECT_HOME": str(repo.parent / "prefect-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlruns.db'}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@invalid",
        **(extra_env or {}),
    }
    if SHARED_BCB.exists():
        env["COSMOCORE_BIGCODEBENCH"] = str(SHARED_BCB)
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "snapshot"], repo, env)
    assert _run(["python", "-c", "import sys; print(sys.prefix)"], repo, env).stdout.strip() == str(venv)
    return repo, env


def run_smoke(scratch: Path, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """`smoke_checkout`, then `dvc exp run -S profile=smoke` (and `args`) in it: the repository, its
    environment and the run's result."""
    repo, env = smoke_checkout(scratch, extra_env)
    return repo, env, _run(["dvc", "exp", "run", "-S", "profile=smoke", *args], repo, env)


def test_smoke_experiment_leaves_metrics_for_base_and_trained_policies(smoke_repo):
    repo, env, _ = smoke_repo
    config = json.loads((repo / "data/config/study.json").read_text())
    heldout = json.loads((repo / "data/metrics/heldout.json").read_text())
    expected = {"base"} | {f"{v}-s{s}" for v in config["variants"] for s in config["seeds"]}
    assert set(heldout) == expected
    for metrics in heldout.values():
        assert 0.0 <= metrics["greedy_pass_at_1"] <= 1.0
        assert 0.0 <= metrics["greedy_hallucination_rate"] <= 1.0
        assert 0.0 <= metrics["hallucination_rate"] <= 1.0 and "pass_at_1" in metrics  # the sampled programs beside
    report = (repo / "data/report/report.md").read_text()
    assert "sampled decoding" in report and "detect" in report  # the smallest detectable effect, or that none was
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    shown_files = {f for repo_metrics in shown.values() for f in repo_metrics["data"]}
    assert shown_files == {"data/metrics/heldout.json"}  # a few headline numbers per policy, read at a glance
    assert all(len(metrics) <= 6 for metrics in heldout.values())
    assert (repo / "data/report/report.md").read_text().startswith("# CosmoCore report (profile `smoke`)")


def test_mlflow_holds_one_parent_and_nested_runs_per_stage(smoke_repo):
    import mlflow

    repo, env, _ = smoke_repo
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["cosmocore"], output_format="pandas")
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1
    nested = runs[runs["tags.mlflow.parentRunId"] == parents["run_id"].iloc[0]]
    stages = nested["tags.cosmocore.stage"].tolist()
    assert {"prepare", "model", "train", "evaluate", "report"} <= set(stages)
    trained = nested[nested["tags.cosmocore.stage"] == "train"]
    variants = json.loads((repo / "data/config/study.json").read_text())["variants"]
    assert set(trained["params.variant"]) == set(variants) == {"grpo", "on_policy", "cosmocore"}
    evaluated = nested[nested["tags.cosmocore.stage"] == "evaluate"]
    assert evaluated["metrics.greedy_pass_at_1"].notna().all()
    # every optimizer update's diagnostics, at its step, beside the per-iteration means
    run_id = trained[trained["params.variant"] == "grpo"]["run_id"].iloc[0]
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "update_advantage_positive_share")
    updates = pd.read_csv(repo / "data/runs/grpo-s0/updates.csv")
    assert sorted(m.step for m in history) == updates["step"].tolist() == list(range(1, len(updates) + 1))
    assert {"advantage_mean", "explained_variance", "kl_behaviour", "grad_norm", "critic_trusted"} <= set(updates)


def test_nothing_reruns_and_a_training_param_touches_only_training_onwards(smoke_repo):
    import yaml

    repo, env, _ = smoke_repo
    assert json.loads(_run(["dvc", "status", "--json"], repo, env).stdout or "{}") == {}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["profile"] == "smoke"
    params["profiles"]["smoke"]["train"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "repro", "config"], repo, env)  # re-resolves the sections; only train.json changes
    changed = set(json.loads(_run(["dvc", "status", "--json"], repo, env).stdout or "{}"))
    # training and what reads its config (the trained policies' evaluation, for the TTC horizon, and the
    # report, which states the training budget) are out of date; prepare, model and the base model's evaluation are not
    variants = json.loads((repo / "data/config/study.json").read_text())["variants"]
    trained = {f"train@{v}-0" for v in variants}
    assert trained <= changed <= trained | {f"evaluate@{v}-0" for v in variants} | {"report"}, changed


def test_stage_launcher_names_the_stages_it_knows():
    result = subprocess.run([sys.executable, "-m", "flows", "no_such_stage"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "usage: python -m flows {prepare,model,train,evaluate,report}" in result.stderr


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_stage_takes_its_prefect_server_with_it(tmp_path):
    import signal
    import time

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    stage = subprocess.Popen([sys.executable, "-m", "flows", "report"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (servers := _children(stage.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servers, "the stage started no server"
        time.sleep(1.0)  # let the server get going
    finally:
        stage.send_signal(signal.SIGKILL)  # no exit handler runs
        stage.wait()
    deadline = time.monotonic() + 30
    while any(_state(pid) not in (None, "Z") for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_state(pid) in (None, "Z") for pid in servers), "the server outlived its stage"
