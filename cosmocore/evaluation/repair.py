"""Self-repair, the inference-time self-correction of `docs/design.md`: for each failing sample, feed its
execution error back (the failing assertion, or the end of the traceback) and ask for a fix, up to
`rounds` rounds; a sample is repaired at the first round whose fix passes.

repair@k = of the samples that fail, the share that pass within k rounds; the mean number of rounds is
taken over the repaired samples. Fixes are generated with the rollout engine (batched, stopping each as
soon as its program is complete) and executed in the one sandbox.

    from cosmocore.evaluation.repair import repair
    result = repair(model, tokenizer, {t.task_id: t for t in tasks}, failed, sandbox, cfg.rollout, style,
                    rounds=cfg.eval.repair_rounds, ks=cfg.eval.repair_k, temperature=cfg.eval.temperature)
    metrics |= result["metrics"]
"""

from __future__ import annotations

import logging
import math
import time

import torch

from cosmocore.config import RolloutConfig
from cosmocore.data.records import Task, Trajectory
from cosmocore.policy.interface import encode
from cosmocore.policy.prompts import error_feedback, extract_code, program_for, repair_prompt
from cosmocore.rl.rollout import _execute, generate
from cosmocore.sandbox.runner import ExecRequest, Sandbox

log = logging.getLogger(__name__)


def repair_at_k(rounds_taken: list[int | None], k: int) -> float:
    """Share of failing samples repaired within `k` rounds (`None`: never repaired). NaN when none failed.

    >>> repair_at_k([1, None, 3, 2], 2)
    0.5
    """
    if not rounds_taken:
        return math.nan
    return sum(r is not None and r <= k for r in rounds_taken) / len(rounds_taken)


def _feedback_of(trajectory: Trajectory, task: Task, sandbox: Sandbox, style: str) -> str:
    """The error a failed trajectory's execution reported (stored by the rollout engine; records written
    before it stored them are executed again)."""
    if "error" in trajectory.extra:
        return trajectory.extra["error"]
    if not trajectory.code:
        return error_feedback("no_code")
    program = program_for(task, trajectory.code, style)
    result = sandbox.run([ExecRequest(task.task_id, program, task.test, task.entry_point, task.test_style)])[0]
    return error_feedback(result.outcome, result.stderr, result.failing_test, result.exception_type)


def repair(model, tokenizer, tasks_by_id: dict[str, Task], failed_trajectories: list[Trajectory], sandbox: Sandbox,
           cfg: RolloutConfig, style: str, rounds: int, ks: list[int] | None = None, greedy: bool = False,
           temperature: float | None = None, seed: int = 0) -> dict:
    """Try to repair each failing trajectory in up to `rounds` rounds of error feedback.

    Returns {"metrics": {repair_samples, repair_at_<k>..., repair_mean_rounds, repair_s},
    "attempts": one dict per failing sample (trajectory_id, task_id, rounds_taken or None, the outcome
    of each round, the final code)}. Trajectories that passed are ignored.
    """
    start = time.perf_counter()
    temperature = cfg.temperature if temperature is None else temperature
    ks = sorted(k for k in set(ks or [rounds]) if k <= rounds)
    torch.manual_seed(seed)
    failing = [t for t in failed_trajectories if t.outcome != "passed"]
    state = []
    for t in failing:
        task = tasks_by_id[t.task_id]
        state.append({"trajectory_id": t.trajectory_id, "task_id": t.task_id, "task": task, "code": t.code, "text": t.text,
                      "feedback": _feedback_of(t, task, sandbox, style), "rounds_taken": None, "outcomes": []})
    too_long = 0
    for round_ in range(1, rounds + 1):
        active = [s for s in state if s["rounds_taken"] is None]
        if not active:
            break
        prompts = []
        for s in active:
            text = repair_prompt(s["task"], s["code"], s["text"], s["feedback"], tokenizer, style)
            ids = encode(model, tokenizer, text)
            if len(ids) > cfg.max_prompt_tokens:
                too_long += 1
                ids = ids[-cfg.max_prompt_tokens :]  # keeps the error and the request to fix it
            prompts.append(ids)
        completions = generate(model, tokenizer, prompts, cfg, style, greedy, temperature,  # batched by the engine
                               desc=f"repair round {round_}")
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        codes = [extract_code(text, style) for text in texts]
        requests = [ExecRequest(s["task_id"], program_for(s["task"], code, style), s["task"].test, s["task"].entry_point,
                                s["task"].test_style) for s, code in zip(active, codes)]
        for s, text, code, result in zip(active, texts, codes, _execute(sandbox, requests)):
            outcome = "no_code" if result is None else result.outcome
            s["outcomes"].append(outcome)
            s["code"], s["text"] = code, text
            if outcome == "passed":
                s["rounds_taken"] = round_
            else:
                s["feedback"] = error_feedback(outcome, result.stderr if result else "", result.failing_test if result else "",
                                               result.exception_type if result else "")
        log.info("repair round %d: %d/%d fixed", round_, sum(s["rounds_taken"] == round_ for s in active), len(active))
    taken = [s["rounds_taken"] for s in state]
    repaired = [r for r in taken if r is not None]
    metrics = {"repair_samples": len(state), "repair_rounds": rounds, "repair_prompts_too_long": too_long}
    metrics |= {f"repair_at_{k}": repair_at_k(taken, k) for k in ks}
    metrics["repair_mean_rounds"] = sum(repaired) / len(repaired) if repaired else math.nan
    metrics["repair_s"] = time.perf_counter() - start
    attempts = [{"trajectory_id": s["trajectory_id"], "task_id": s["task_id"], "rounds_taken": s["rounds_taken"],
                 "outcomes": s["outcomes"], "code": s["code"]} for s in state]
    return {"metrics": metrics, "attempts": attempts}
