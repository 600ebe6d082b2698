"""The learning benchmark end to end at its smoke size (the tiny model, a few arms): the command-line
entry point, one RESULT line per arm with the base first and its own differences 0, the JSON with every
arm's paired comparisons, timings and training history, and the plots."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # the benchmark end to end: `pytest -m "not slow"` skips it

FIELDS = ("halluc", "halluc_diff", "halluc_ci", "pass", "pass_diff", "pass_ci", "no_code", "syntax", "tasks", "n")


def _bench(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosmocore.cli", "bench", "learning", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=900)


def test_smoke_learning_bench_reports_every_arm_against_the_base(tmp_path):
    out = tmp_path / "bench"
    done = _bench("--size", "smoke", "--arms", "grpo,cosmocore", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    # a default run's log: no deprecation warnings, and no library's INFO chatter (great_expectations' at import)
    log = done.stdout + done.stderr
    assert not re.findall(r".*(?:FutureWarning|DeprecationWarning|deprecated).*", log, re.IGNORECASE)
    assert not re.findall(r"(?:^|\r)((?!cosmocore\.)\S+ INFO .*)", log, re.MULTILINE)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT learning ")]
    assert [line.split()[2] for line in lines] == ["base", "grpo", "cosmocore"]
    rows = {line.split()[2]: dict(field.split("=", 1) for field in line.split()[3:]) for line in lines}
    for arm, row in rows.items():
        assert set(FIELDS) <= set(row), (arm, row)
        assert re.fullmatch(r"[-+]?\d+\.\d+,[-+]?\d+\.\d+", row["halluc_ci"]) and re.fullmatch(r"[-+]?\d+\.\d+,[-+]?\d+\.\d+", row["pass_ci"])
        assert int(row["tasks"]) == 4 and int(row["n"]) == 8  # 4 held-out tasks × 2 samples
    assert float(rows["base"]["halluc_diff"]) == 0 and rows["base"]["halluc_ci"] == "+0.0000,+0.0000"

    result = json.loads((out / "learning.json").read_text())
    assert result["arms"] == ["base", "grpo", "cosmocore"] and "against the base" in result["primary_comparison"]
    for arm in ("grpo", "cosmocore"):
        row = result["arm"][arm]
        assert float(rows[arm]["halluc"]) == round(row["halluc"], 4)
        assert row["vs_base"]["halluc"]["ci"][0] <= row["vs_base"]["halluc"]["diff"] <= row["vs_base"]["halluc"]["ci"][1]
        assert len(row["history"]) == 2 and row["updates"] and {"advantage_mean", "advantage_positive_share",
                                                                  "explained_variance", "step"} <= set(row["updates"][0])
        assert row["wall_s"]["train"] > 0 and row["wall_s"]["evaluate"] > 0
    assert set(result["wall_s"]) >= {"prepare", "model", "total"}
    assert (out / "curves.png").stat().st_size > 0 and (out / "heldout.png").stat().st_size > 0


def test_an_unknown_arm_is_refused_before_any_work(tmp_path):
    done = _bench("--size", "smoke", "--arms", "grpo,dreamy", "--out", str(tmp_path / "bench"))
    assert done.returncode == 2 and "unknown arm(s) ['dreamy']" in done.stderr and "grpo" in done.stderr
    assert not (tmp_path / "bench").exists()
