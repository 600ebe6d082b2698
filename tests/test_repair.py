"""Self-repair: error feedback, repair prompts, repair@k and rounds taken."""

from __future__ import annotations

import math
import re

import pytest

from cosmocore.data.records import Task, Trajectory
from cosmocore.evaluation import repair as repair_module
from cosmocore.evaluation.repair import repair, repair_at_k
from cosmocore.policy.models import load_policy
from cosmocore.policy.prompts import error_feedback, repair_prompt
from cosmocore.sandbox.runner import ExecResult


def _task(name: str) -> Task:
    return Task(task_id=f"t/{name}", benchmark="humaneval", prompt=f"def {name}(x):\n    \"\"\"Return x plus one.\"\"\"\n",
                instruction="", entry_point=name, test="def check(candidate):\n    assert candidate(1) == 2\n",
                test_style="humaneval", canonical_solution="    return x + 1\n")


def _trajectory(task: Task, code: str, outcome: str, error: str | None = "This test failed: assert candidate(1) == 2") -> Trajectory:
    extra = {"failing_test": "assert candidate(1) == 2"} | ({"error": error} if error is not None else {})
    return Trajectory(trajectory_id=f"r/{task.task_id}/0", run="r", variant="base", seed=0, iteration=0, task_id=task.task_id,
                      sample=0, kind="code", prompt_ids=[1], completion_ids=[2], behaviour_logprobs=[], mean_entropy=math.nan,
                      hidden=[], text=f"```python\n{code}\n```", code=code, outcome=outcome, hallucinated=False,
                      hallucination_evidence="", exception_type="", test_share=math.nan, reward=0.0, extra=extra)


class PlusOneSandbox:
    """Passes a program whose function returns x + 1; a wrong answer otherwise."""

    def __init__(self):
        self.runs = 0

    def run(self, requests, progress=False):
        self.runs += len(requests)
        return [self._one(r) for r in requests]

    @staticmethod
    def _one(request):
        ok = "return x + 1" in request.program
        return ExecResult(request.task_id, "passed" if ok else "wrong_answer", ok, False, [], False, False,
                          "" if ok else "AssertionError", "" if ok else "assert candidate(1) == 2",
                          "" if ok else "Traceback (most recent call last):\n  File \"<test>\", line 2\nAssertionError",
                          math.nan, 0.0, 0.0)


def test_error_feedback_is_trimmed_and_specific():
    assert error_feedback("wrong_answer", "Traceback ...\nAssertionError", "assert f(1) == 2") == "This test failed: assert f(1) == 2"
    trace = "Traceback (most recent call last):\n" + "".join(f'  File "<program>", line {i}\n' for i in range(30)) + "NameError: name 'y' is not defined"
    feedback = error_feedback("runtime_error", trace, "", "NameError")
    assert feedback.endswith("NameError: name 'y' is not defined") and len(feedback.splitlines()) <= 8
    assert "Traceback" not in feedback
    assert "no Python code" in error_feedback("no_code")
    assert "timed out" in error_feedback("timeout")


def test_repair_prompt_shows_the_attempt_and_the_error(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = _task("inc")
    prompt = repair_prompt(task, "def inc(x):\n    return x", "", "This test failed: assert inc(1) == 2", tokenizer, "chat")
    assert prompt.count("<|im_start|>user") == 2 and "<|im_start|>assistant\ndef" not in prompt
    assert "return x\n```" in prompt and "assert inc(1) == 2" in prompt and prompt.endswith("<|im_start|>assistant\n")
    plain = repair_prompt(task, "    return x", "", "This test failed: assert inc(1) == 2", tokenizer, "completion")
    assert plain.endswith(task.prompt) and "# This test failed: assert inc(1) == 2" in plain


def test_repair_at_k_and_mean_rounds(tiny_model_dir, config, monkeypatch):
    model, tokenizer = load_policy(tiny_model_dir, config.model)  # the model only encodes prompts here
    tasks = {t.task_id: t for t in map(_task, ["fa", "fb", "fc", "fd"])}
    fixed_at = {"fa": 1, "fb": 2, "fc": None}  # fd passed already: not a repair candidate
    asked: dict[str, list[str]] = {name: [] for name in fixed_at}

    def fake_generate(model, tokenizer, prompts, cfg, style, greedy, temperature, desc=None):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            name = re.search(r"def (f\w)\(x\):\n    \"\"\"", text).group(1)
            asked[name].append(text)
            right = fixed_at[name] is not None and len(asked[name]) >= fixed_at[name]
            body = "x + 1" if right else f"x + {len(asked[name]) + 1}"
            out.append(tokenizer(f"```python\ndef {name}(x):\n    return {body}\n```", add_special_tokens=False)["input_ids"])
        return out

    monkeypatch.setattr(repair_module, "generate", fake_generate)
    trajectories = [_trajectory(tasks["t/fa"], "def fa(x):\n    return x", "wrong_answer"),
                    _trajectory(tasks["t/fb"], "", "no_code", error=None),
                    _trajectory(tasks["t/fc"], "def fc(x):\n    return y", "runtime_error", error="NameError: name 'y' is not defined"),
                    _trajectory(tasks["t/fd"], "def fd(x):\n    return x + 1", "passed", error="")]
    sandbox = PlusOneSandbox()
    result = repair(model, tokenizer, tasks, trajectories, sandbox, config.rollout, "chat", rounds=3, ks=[1, 2, 3])
    metrics = result["metrics"]
    assert metrics["repair_samples"] == 3
    assert metrics["repair_at_1"] == pytest.approx(1 / 3) and metrics["repair_at_2"] == pytest.approx(2 / 3)
    assert metrics["repair_at_3"] == pytest.approx(2 / 3) and metrics["repair_mean_rounds"] == pytest.approx(1.5)
    by_id = {a["task_id"]: a for a in result["attempts"]}
    assert by_id["t/fa"]["rounds_taken"] == 1 and by_id["t/fb"]["rounds_taken"] == 2 and by_id["t/fc"]["rounds_taken"] is None
    assert by_id["t/fc"]["outcomes"] == ["wrong_answer"] * 3
    assert "NameError: name 'y' is not defined" in asked["fc"][0]  # the stored error is fed back ...
    assert "no Python code" in asked["fb"][0]  # ... also when there was no code
    assert "This test failed: assert candidate(1) == 2" in asked["fc"][1]  # ... and each round's new error
    assert len(asked["fa"]) == 1 and sandbox.runs == 3 + 2 + 1


def test_repair_runs_on_the_tiny_model(tiny_model_dir, config):
    model, tokenizer = load_policy(tiny_model_dir, config.model)
    task = _task("inc")
    cfg = config.rollout.model_copy(update={"max_new_tokens": 8})
    result = repair(model, tokenizer, {task.task_id: task}, [_trajectory(task, "def inc(x):\n    return x", "wrong_answer")],
                    PlusOneSandbox(), cfg, "chat", rounds=2, ks=[1, 2])
    assert result["metrics"]["repair_samples"] == 1 and len(result["attempts"][0]["outcomes"]) in (1, 2)
    assert 0.0 <= result["metrics"]["repair_at_2"] <= 1.0


def test_repair_at_k_of_nothing_is_nan():
    assert math.isnan(repair_at_k([], 1))
    assert repair_at_k([None, 1], 1) == 0.5
