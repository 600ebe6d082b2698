"""CodeRL+ end to end on the tiny model: both variants go through rollout → align → tag → gate →
nocturnal train, and alignment samples are in the buffer and in every training minibatch at
`alignment.share`.

The tiny model is randomly initialised and writes no runnable code, so its own programs could feed no
alignment question. After the real rollout, each code sample's program is therefore replaced by one a
model could have written: the task's reference solution with one integer literal off by one (sample
0 keeps it intact). The replacement is scored under the policy (behaviour log-probs, entropy, hidden
state) and executed in the real sandbox (outcome, hallucination flag, reward), as the rollout records a
sample. Everything after that is the training flow's own code path (`loop.align`, `loop.tag`,
`loop.gate`, `loop.nocturnal` on `mixing.make_buffer`'s buffer); the only addition is a pass-through
on the buffer's `sample` that records each minibatch.
"""

from __future__ import annotations

import ast
import dataclasses
import math

import pytest
import torch

from cosmocore.data.datasets import load_humaneval
from cosmocore.data.records import Task, Trajectory
from cosmocore.policy.interface import score
from cosmocore.policy.models import load_policy
from cosmocore.policy.prompts import error_feedback, extract_code, program_for, resolve_style
from cosmocore.rl.loop import LoopState, align, gate, nocturnal, tag
from cosmocore.rl.mixing import KindMix, make_buffer
from cosmocore.rl.rewards import reward_for
from cosmocore.rl.rollout import RunIds, rollout
from cosmocore.rl.trainer import build_learner
from cosmocore.sandbox.runner import ExecRequest, Sandbox
from cosmocore.variants import ALIGNMENT_VARIANTS

SEED = 0
TASK_IDS = ("HumanEval/17", "HumanEval/18", "HumanEval/31")  # short, with literal test calls and int literals
SAMPLES = 4  # per task: 12 code samples, so round(0.4 / 0.6 × 12) = 8 alignment answers
MINIBATCH = 10  # 0.4 × 10 = 4 alignment entries in every minibatch, exactly
ITERATIONS = 2


@pytest.fixture(scope="module")
def cfg(config):
    return config.model_copy(update={
        "rollout": config.rollout.model_copy(update={"max_new_tokens": 16, "batch_size": 12}),
        "alignment": config.alignment.model_copy(update={"max_new_tokens": 16, "samples_per_task": 2}),
        "affect": config.affect.model_copy(update={"epochs": 20}),
        "train": config.train.model_copy(update={"iterations": ITERATIONS, "updates_per_iteration": 3,
                                                 "minibatch_size": MINIBATCH}),
        "sandbox": config.sandbox.model_copy(update={"workers": 2}),
    })


@pytest.fixture(scope="module")
def sandbox(cfg):
    with Sandbox(cfg.sandbox) as pool:
        yield pool


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return [task for task in load_humaneval() if task.task_id in TASK_IDS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast for a model this small, and kind to shared cores
    yield
    torch.set_num_threads(threads)


def off_by_one(task: Task, which: int | None) -> str:
    """The task's reference function with its `which`-th integer literal (source order, cycling) one
    larger; `None` leaves it intact."""
    tree = ast.parse(task.prompt + task.canonical_solution)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == task.entry_point)
    if ast.get_docstring(function) is not None:
        function.body = function.body[1:] or [ast.Pass()]  # a model's answer seldom repeats the docstring
    literals = sorted((node for node in ast.walk(function) if isinstance(node, ast.Constant) and type(node.value) is int),
                      key=lambda node: (node.lineno, node.col_offset))
    if which is not None:
        literals[which % len(literals)].value += 1
    return ast.unparse(function)


def as_if_written(trajectories: list[Trajectory], tasks: list[Task], model, tokenizer, sandbox, cfg, style) -> list[Trajectory]:
    """Each sample with its program replaced (module docstring): scored and executed for real."""
    by_id = {task.task_id: task for task in tasks}
    texts = [f"```python\n{off_by_one(by_id[t.task_id], t.sample - 1 if t.sample else None)}\n```" for t in trajectories]
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    with torch.no_grad():
        scored = score(model, [t.prompt_ids for t in trajectories], completions, tokenizer.pad_token_id, cfg.rollout.temperature)
    entropy = scored.mean_entropy()
    codes = [extract_code(text, style) for text in texts]
    tasks_of = [by_id[t.task_id] for t in trajectories]
    results = sandbox.run([ExecRequest(task.task_id, program_for(task, code, style), task.test, task.entry_point, task.test_style)
                           for task, code in zip(tasks_of, codes)])
    return [
        dataclasses.replace(
            t, text=text, code=code, completion_ids=completion,
            behaviour_logprobs=scored.logprobs[row, : len(completion)].tolist(), mean_entropy=float(entropy[row]),
            hidden=scored.hidden[row].tolist(), outcome=result.outcome, hallucinated=result.hallucinated,
            hallucination_evidence="; ".join(result.hallucination_evidence), exception_type=result.exception_type,
            test_share=result.test_share, reward=reward_for(result.outcome, result.hallucinated, result.test_share, cfg.reward),
            extra={"static": result.hallucination_static, "runtime": result.hallucination_runtime,
                   "failing_test": result.failing_test, "error": "" if result.outcome == "passed" else error_feedback(
                       result.outcome, result.stderr, result.failing_test, result.exception_type)},
        )
        for row, (t, text, code, completion, result) in enumerate(zip(trajectories, texts, codes, completions, results))
    ]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ALIGNMENT_VARIANTS)
def test_alignment_samples_train_at_the_configured_share(variant, cfg, tasks, sandbox, tiny_model_dir, monkeypatch):
    share = cfg.alignment.share
    model, tokenizer = load_policy(tiny_model_dir, cfg.model)
    style = resolve_style(cfg.model.prompt_style, tokenizer)
    learner = build_learner(model, cfg.train, tokenizer.pad_token_id, cfg.rollout.temperature, seed=SEED)
    buffer = make_buffer(cfg.buffer, variant, SEED, share)
    assert isinstance(buffer, KindMix)
    served, draw = [], buffer.sample

    def recorded(batch_size: int, progress: float):  # a pass-through that keeps each minibatch
        served.append(draw(batch_size, progress))
        return served[-1]

    monkeypatch.setattr(buffer, "sample", recorded)
    state = LoopState()
    for i in range(ITERATIONS):
        ids = RunIds(run=f"{variant}-s{SEED}", variant=variant, seed=SEED, iteration=i)
        sampled, _ = rollout(learner.model, tokenizer, tasks, sandbox, cfg.rollout, cfg.reward, style, ids,
                             samples_per_task=SAMPLES, seed=SEED * 10_000 + i)
        code = as_if_written(sampled, tasks, learner.model, tokenizer, sandbox, cfg, style)
        outcomes = {t.outcome for t in code}
        assert "passed" in outcomes and "wrong_answer" in outcomes, outcomes  # the sandbox's verdicts, not ours

        answers, metrics = align(learner.model, tokenizer, tasks, code, sandbox, cfg.alignment, cfg.rollout, style, ids)
        assert answers and all(a.kind == "alignment" for a in answers)
        failed = {t.trajectory_id for t in code if t.outcome != "passed"}
        assert {a.extra["source_trajectory_id"] for a in answers} <= failed  # questions about failed programs
        wanted = share / (1 - share) * len(code)  # answers that make them `share` of the iteration's samples
        rounding = 0.5 + cfg.alignment.samples_per_task - 1  # to whole answers, then to whole questions
        assert abs(len(answers) - wanted) <= rounding, (len(answers), wanted, metrics)
        assert abs(metrics["iteration_alignment_share"] - share) <= rounding / (len(answers) + len(code))

        trajectories = code + answers
        metrics |= tag(trajectories, state, cfg.affect, SEED)[1]
        metrics |= gate(buffer, trajectories, variant, state.expected)
        stored = [entry for entry in buffer.entries() if entry["kind"] == "alignment"]
        new = [entry for entry in stored if entry["trajectory_id"] in {a.trajectory_id for a in answers}]
        assert new and len(new) == metrics["gate_alignment_stored"]  # this iteration's answers are in the buffer

        steps, served[:] = learner.steps, []
        metrics |= nocturnal(learner, buffer, variant, cfg.train, i, state.expected)[0]
        assert metrics["updates"] > 0 and learner.steps == steps + metrics["updates"] == steps + len(served)
        per_batch = round(share * MINIBATCH)  # 4, exactly 0.4 of 10
        assert len(stored) >= per_batch, "too few alignment entries stored to fill a minibatch's share"
        for batch in served:
            kinds = [entry["kind"] for entry in batch.entries]
            assert len(kinds) == MINIBATCH and kinds.count("alignment") == per_batch
        assert metrics["batch_alignment_share"] == per_batch / MINIBATCH == share
        assert math.isfinite(metrics["train_loss"])
        print(f"{variant} iteration {i}: {len(code)} code samples {sorted(outcomes)}, {len(answers)} answers "
              f"(built {metrics['align_built']}, iteration share {metrics['iteration_alignment_share']:.3f}); buffer holds "
              f"{len(stored)} alignment of {len(buffer)}; {metrics['updates']} updates, alignment share per minibatch "
              f"{[[e['kind'] for e in b.entries].count('alignment') / len(b) for b in served]}")
        state.iteration = i + 1
    assert learner.steps > 0
