"""CodeRL+ execution-semantics alignment (arXiv 2510.18471): tasks that ask the policy what its own code
computes, rewarded against the real execution.

A pass/fail reward says that a program is wrong, not why. From executed rollouts this module builds
tasks: "here is your program and a call; what does the call return, and what do these local variables
hold when it returns?". The answer is a JSON object, scored against a trace of that very call in the
sandbox: 0.1 for the right shape plus 0.9 × the share of items right.

    trajectories ──► build_alignment_tasks ──► AlignmentTask (program, call, expected values, prompt)
                       (pick a test input, trace twice,          │
                        keep exact, deterministic values)        ▼
                                               the policy's answer ──► alignment_reward ──► reward

`output_prediction_tasks` builds the CRUXEval-O style evaluation the same way, from reference solutions.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from cosmocore.config import AlignmentConfig
from cosmocore.data.records import Task, Trajectory
from cosmocore.policy.prompts import program_for
from cosmocore.sandbox.runner import Sandbox, TraceResult

FORMAT_CREDIT = 0.1  # for a parsable answer of the right shape; the rest is shared among the items
REL_TOL, ABS_TOL = 1e-6, 1e-9  # float tolerance: a model writes 0.333333 for 1/3
# Rollout outcomes worth re-running: the program loaded and ran. The others cannot yield a trace.
TRACEABLE = ("passed", "wrong_answer", "runtime_error")
SKIPS = ("skipped_error", "skipped_timeout", "skipped_incomparable", "skipped_nondeterministic",
         "skipped_duplicate", "skipped_complexity", "skipped_no_input")
# Stand-ins the tracer writes for what JSON cannot hold: object reprs, Constructor(...) reprs
# (numpy scalars, Decimal, datetime), integers beyond 2**53, non-finite floats.
REPR_LIKE = re.compile(r"<.*>|[\w.]+\(.*\)|-?\d{16,}|-?inf|nan", re.DOTALL)
TRACER_MAX_ITEMS = 64  # sandbox.worker.json_safe keeps this many items of a container, silently
TRACER_MAX_DEPTH = 3  # ... and writes containers nested deeper than this as repr strings
FENCED = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)
# The answer is started for the model: its turn opens with this, so it writes values, not code. Without
# it SmolLM2-135M answered 0 of 8 questions with JSON (it rewrote the program instead).
ANSWER_PREFIX = '```json\n{"output": '


@dataclass(frozen=True)
class AlignmentTask:
    """One execution-reasoning question with its verified answer."""

    alignment_id: str
    task_id: str  # the benchmark task whose program is traced
    source_trajectory_id: str  # the rollout the program came from ("" for a reference solution)
    program: str  # the whole program the sandbox ran
    call: str  # the traced call, e.g. "f([1, 2])"
    expected_output: Any  # JSON value the call returned
    expected_variables: dict[str, Any]  # name → final JSON value, least recently assigned first
    prompt_text: str  # the question, before any chat template

    def reward(self, answer_text: str) -> float:
        return alignment_reward(answer_text, self.expected_output, self.expected_variables)


# ------------------------------------------------------------------------------------ test inputs


def test_inputs(task: Task) -> list[str]:
    """Calls of the task's function with literal arguments, found in its tests, in source order.

    HumanEval tests call `candidate(...)` inside `check(candidate)`; BigCodeBench tests call the
    entry point (`task_func(...)`) inside unittest methods. Calls whose arguments are not all literals
    (a variable, a DataFrame, `*args`) are skipped: the call must make sense on its own. Each call is
    rewritten to name the entry point, e.g. `candidate([1, 2], 3)` → `has_close_elements([1, 2], 3)`.
    """
    try:
        tree = ast.parse(task.test)
    except SyntaxError as error:
        raise ValueError(f"{task.task_id}: its test code does not parse ({error})") from None
    names = _callee_names(tree, task.entry_point)
    calls = sorted((node for node in ast.walk(tree) if _is_literal_call(node, names)),
                   key=lambda node: (node.lineno, node.col_offset))
    rendered = (ast.unparse(ast.Call(ast.Name(task.entry_point), node.args, node.keywords)) for node in calls)
    return list(dict.fromkeys(rendered))


def _callee_names(tree: ast.Module, entry_point: str) -> set[str]:
    """The names the tests call the function under: the entry point and `check`'s parameter."""
    names = {entry_point}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check" and node.args.args:
            names.add(node.args.args[0].arg)
    return names


def _is_literal_call(node: ast.AST, names: set[str]) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names):
        return False
    if any(isinstance(arg, ast.Starred) for arg in node.args) or any(kw.arg is None for kw in node.keywords):
        return False
    try:
        for argument in [*node.args, *(kw.value for kw in node.keywords)]:
            ast.literal_eval(argument)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


# ---------------------------------------------------------------------------------------- prompts


def alignment_prompt(program: str, call: str, variables: Sequence[str] = ()) -> str:
    """The question: the code, the call, and the JSON shape of the answer naming the variables asked."""
    function = ast.parse(call, mode="eval").body.func.id
    if variables:
        slots = ", ".join(f'"{name}": ...' for name in variables)
        shape = f'{{"output": ..., "variables": {{{slots}}}}}'
        asked = (f'where "output" is the value the call returns and "variables" holds the values the local '
                 f"variables {', '.join(variables)} of `{function}` have when that call returns.")
    else:
        shape = '{"output": ...}'
        asked = 'where "output" is the value the call returns.'
    return (f"Here is a Python program:\n\n```python\n{program.rstrip()}\n```\n\n"
            f"Work out, without running it, what happens when it is called as `{call}`.\n"
            f"Answer with only a JSON object of this shape:\n{shape}\n{asked}\n"
            "Write tuples and sets as lists, dictionary keys as strings, None as null.")


def alignment_chat_prompt(tokenizer, text: str, style: str) -> str:
    """The model input for a question, like `prompts.build_prompt` for code: the chat template for an
    instruct model, the bare question for a base model. `answer` encodes it with `ANSWER_PREFIX`, the
    start of the JSON answer, for the model to continue (`policy.encode`: after the prompt for a
    decoder-only model, at the start of the decoder's side for an encoder-decoder one)."""
    if style == "chat":
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if style == "completion":
        return text + "\n\n"
    raise ValueError(f"prompt style must be chat or completion (resolve 'auto' first), got {style!r}")


def answer_complete(continuation: str) -> bool:
    """Whether a continuation of `ANSWER_PREFIX` has closed the answer's JSON object (or its fence):
    generation can stop there.

    >>> answer_complete('[1, {"a": 2}]'), answer_complete('[1, {"a": 2}]}'), answer_complete('oops\\n```')
    (False, True, True)
    """
    text = ANSWER_PREFIX + continuation
    try:
        json.JSONDecoder().raw_decode(text, text.index("{"))
    except ValueError:
        return "```" in continuation
    return True


# ----------------------------------------------------------------------------------------- reward


def parse_answer(text: str) -> dict | None:
    """The answer's JSON object: the first one in a fenced block, else the first in the text.

    >>> parse_answer('Sure!\\n```json\\n{"output": 3}\\n```')
    {'output': 3}
    >>> parse_answer('It returns {"output": [1, 2], "variables": {}} I think.')
    {'output': [1, 2], 'variables': {}}
    >>> parse_answer("no idea") is None
    True
    """
    fenced = FENCED.search(text)
    return (_first_object(fenced.group(1)) if fenced else None) or _first_object(text)


def _first_object(text: str) -> dict | None:
    decoder = json.JSONDecoder()
    for brace in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, brace.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def same_value(expected: Any, actual: Any) -> bool:
    """JSON values equal up to float tolerance. Integers compare exactly (tolerance is for float
    rounding, not for being nearly right), booleans are not numbers, lists compare in order,
    dictionaries by keys regardless of order, strings exactly.

    >>> same_value(0.1 + 0.2, 0.3), same_value(1, 1.0), same_value(1000000, 1000001)
    (True, True, False)
    >>> same_value(True, 1), same_value([1, [2, 3]], [1, [2, 3]]), same_value({"a": 1, "b": 2}, {"b": 2, "a": 1})
    (False, True, True)
    >>> same_value(3, [3, 4]), same_value("3", 3)
    (False, False)
    """
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, int) and isinstance(actual, int):
        return expected == actual
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(expected, actual, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(expected) == len(actual) and all(map(same_value, expected, actual))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(same_value(v, actual[k]) for k, v in expected.items())
    return type(expected) is type(actual) and expected == actual


def alignment_reward(answer_text: str, expected_output: Any, expected_variables: dict[str, Any]) -> float:
    """0.1 for a parsable answer of the right shape, plus 0.9 × the share of items right; 0.0 otherwise.

    The items are the output and each expected variable. The right shape is a JSON object with an
    "output" key and a "variables" object (which may be left out when no variable is asked). Keys not
    asked for are ignored and a missing variable is wrong, so an answer never scores more than the same
    answer holding only its correct items: hedging with extra keys or candidate lists earns nothing.

    >>> expected = {"acc": 14, "label": "sum=14"}
    >>> alignment_reward('{"output": 14, "variables": {"acc": 14, "label": "sum=14"}}', 14, expected)
    1.0
    >>> alignment_reward('```json\\n{"output": 14, "variables": {"acc": 13}}\\n```', 14, expected)
    0.4
    >>> alignment_reward('{"output": [13, 14], "variables": {"acc": 14, "i": 3}}', 14, expected)
    0.4
    >>> alignment_reward('{"output": 0, "variables": {}}', 14, expected)
    0.1
    >>> alignment_reward('{"output": 14, "variables": [14]}', 14, expected), alignment_reward("14", 14, {})
    (0.0, 0.0)
    >>> alignment_reward('{"output": 2.0000000001}', 2.0, {})
    1.0
    """
    answer = parse_answer(answer_text)
    if answer is None or "output" not in answer:
        return 0.0
    variables = answer.get("variables", None if expected_variables else {})
    if not isinstance(variables, dict):
        return 0.0
    right = same_value(expected_output, answer["output"]) + sum(
        name in variables and same_value(value, variables[name]) for name, value in expected_variables.items())
    share = right / (1 + len(expected_variables))
    return round(FORMAT_CREDIT + (1.0 - FORMAT_CREDIT) * share, 6)  # 0.4, not 0.39999999999999997


# ------------------------------------------------------------------------------- task construction


def build_alignment_tasks(trajectories: list[Trajectory], tasks: dict[str, Task], sandbox: Sandbox,
                          cfg: AlignmentConfig, seed: int, style: str) -> tuple[list[AlignmentTask], dict[str, int]]:
    """Alignment tasks from executed code rollouts (failed ones, or all, by `cfg.source`).

    Each rollout's program is traced on one of its task's test inputs, picked by `seed` and the
    program, so identical programs get the same question and are deduplicated. A rollout is skipped,
    and counted under its reason in the returned stats, when it cannot run (its rollout did not load or
    ran out of time, or the traced call errors or times out), when nothing comparable comes out (no
    exact output, or nothing but a None output), when two traces disagree (randomness, clocks), or when
    the call executes fewer than `cfg.min_lines` or more than `cfg.max_lines` lines. `style` is the
    prompt style the rollouts were sampled with, as `program_for` needs it.
    """
    stats = {"built": 0, **dict.fromkeys(SKIPS, 0)}
    jobs: dict[tuple[str, str], Trajectory] = {}  # (program, call) → the first rollout that asks it
    inputs: dict[str, list[str]] = {}
    for trajectory in _sources(trajectories, cfg.source):
        if trajectory.outcome not in TRACEABLE:
            stats["skipped_timeout" if trajectory.outcome == "timeout" else "skipped_error"] += 1
            continue
        task = _task_of(trajectory, tasks)
        if task.task_id not in inputs:
            inputs[task.task_id] = test_inputs(task)
        calls = inputs[task.task_id]
        if not calls:
            stats["skipped_no_input"] += 1
            continue
        program = program_for(task, trajectory.code, style)
        key = (program, random.Random(f"{seed}:{_digest(program)}").choice(calls))
        if key in jobs:
            stats["skipped_duplicate"] += 1
            continue
        jobs[key] = trajectory
    built = []
    traces = _trace_all(sandbox, list(jobs), cfg.max_variables, cfg.max_value_chars)
    for ((program, call), trajectory), (first, second) in zip(jobs.items(), traces):
        verdict = _examine(first, second, cfg.max_value_chars)
        if isinstance(verdict, str):
            stats[verdict] += 1
        elif not cfg.min_lines <= len(first.lines) <= cfg.max_lines:
            stats["skipped_complexity"] += 1
        else:
            built.append(_alignment_task(trajectory.task_id, trajectory.trajectory_id, program, call, *verdict))
    stats["built"] = len(built)
    return built, stats


def output_prediction_tasks(tasks: list[Task], sandbox: Sandbox, cfg: AlignmentConfig,
                            seed: int = 0) -> list[AlignmentTask]:
    """CRUXEval-O style evaluation: given a task's reference solution and one test input, predict the
    output. The first `cfg.eval_tasks` tasks (in order) whose reference yields an exact, deterministic
    output on the picked input; their expected variables are empty, so the reward counts the output only.
    Tasks are traced a chunk at a time, so a long task list costs only what the quota needs."""
    candidates = [(task, calls) for task in tasks if (calls := test_inputs(task))]
    jobs = [(task.reference_program, random.Random(f"{seed}:{task.task_id}").choice(calls)) for task, calls in candidates]
    built: list[AlignmentTask] = []
    chunk = max(cfg.eval_tasks, sandbox.size)
    for start in range(0, len(jobs), chunk):
        if len(built) >= cfg.eval_tasks:
            break
        traces = _trace_all(sandbox, jobs[start : start + chunk], 0, cfg.max_value_chars)
        for (task, _), (program, call), (first, second) in zip(candidates[start:], jobs[start:], traces):
            verdict = _examine(first, second, cfg.max_value_chars)
            if not isinstance(verdict, str):
                built.append(_alignment_task(task.task_id, "", program, call, verdict[0], {}))
    return built[: cfg.eval_tasks]


def _sources(trajectories: list[Trajectory], source: str) -> list[Trajectory]:
    code = [t for t in trajectories if t.kind == "code"]
    return code if source == "all" else [t for t in code if t.outcome != "passed"]


def _task_of(trajectory: Trajectory, tasks: dict[str, Task]) -> Task:
    try:
        return tasks[trajectory.task_id]
    except KeyError:
        raise ValueError(f"trajectory {trajectory.trajectory_id} is for task {trajectory.task_id!r}, which is not "
                         "among the tasks given: pass the tasks the rollouts were sampled from") from None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _trace_all(sandbox: Sandbox, jobs: list[tuple[str, str]], max_vars: int,
               max_chars: int) -> list[tuple[TraceResult, TraceResult]]:
    """Trace each (program, call) twice, in parallel over the sandbox's workers: the second trace
    tells a deterministic program from one whose values would make an unanswerable question."""
    def twice(job: tuple[str, str]) -> tuple[TraceResult, TraceResult]:
        return tuple(sandbox.trace(*job, max_vars=max_vars, max_chars=max_chars) for _ in range(2))

    if not jobs:
        return []
    with ThreadPoolExecutor(max(1, sandbox.size)) as pool:
        return list(tqdm(pool.map(twice, jobs), total=len(jobs), desc="trace", unit="program", leave=False))


def _examine(first: TraceResult, second: TraceResult, max_chars: int) -> str | tuple[Any, dict[str, Any]]:
    """The comparable (output, variables) of a traced call, or the stats key saying why there are none.
    Variables whose value is not exact are dropped; an inexact output drops the whole call."""
    if "timeout" in (first.outcome, second.outcome):
        return "skipped_timeout"
    if first.outcome != "passed" or second.outcome != "passed":
        return "skipped_error"
    if (first.output, first.variables) != (second.output, second.variables):
        return "skipped_nondeterministic"
    variables = {name: value for name, value in first.variables.items() if is_exact(value, max_chars)}
    if not is_exact(first.output, max_chars) or (first.output is None and not variables):
        return "skipped_incomparable"
    return first.output, variables


def is_exact(value: Any, max_chars: int, depth: int = 0) -> bool:
    """Whether a traced value is the value itself rather than one of the tracer's stand-ins.

    The sandbox's `json_safe` cuts strings longer than `max_chars` (adding "..."), keeps 64 items of a
    container, and writes deeper containers and values JSON cannot hold as repr strings. A stand-in
    is a question no one can answer, so anything that may be one is refused: this drops a few honest
    strings (a literal "f(x)", say) but never asks for a repr.

    >>> is_exact({"a": [1, 2.5, None, "x"]}, 200), is_exact("<Foo object>", 200), is_exact("np.int64(3)", 200)
    (True, False, False)
    >>> is_exact("y" * 200 + "...", 200), is_exact(list(range(64)), 200), is_exact([[["[1]"]]], 200)
    (False, False, False)
    """
    if isinstance(value, str):
        cut = len(value) > max_chars and value.endswith("...")
        return not (cut or depth >= TRACER_MAX_DEPTH or REPR_LIKE.fullmatch(value))
    if isinstance(value, list):
        return len(value) < TRACER_MAX_ITEMS and all(is_exact(item, max_chars, depth + 1) for item in value)
    if isinstance(value, dict):
        # keys are str() of the key's picture: "[1, 2]" for a tuple key, so a bracketed key is a stand-in
        keys_exact = all(is_exact(key, max_chars, depth + 1) and not key.startswith(("[", "{")) for key in value)
        return len(value) < TRACER_MAX_ITEMS and keys_exact and all(
            is_exact(item, max_chars, depth + 1) for item in value.values())
    return True


def _alignment_task(task_id: str, trajectory_id: str, program: str, call: str, output: Any,
                    variables: dict[str, Any]) -> AlignmentTask:
    return AlignmentTask(
        alignment_id=f"{task_id}/align/{_digest(program + chr(0) + call)[:12]}",
        task_id=task_id,
        source_trajectory_id=trajectory_id,
        program=program,
        call=call,
        expected_output=output,
        expected_variables=variables,
        prompt_text=alignment_prompt(program, call, list(variables)),
    )


# ------------------------------------------------------------------------------------ answering


def pick_for_share(built: list[AlignmentTask], n_code: int, cfg: AlignmentConfig, seed: int) -> list[AlignmentTask]:
    """The alignment tasks to answer this iteration so that answers make up `cfg.share` of the
    iteration's samples (code samples are `n_code`); all of them when fewer were built: the share then
    falls short and is logged as measured, never padded."""
    if cfg.share <= 0 or not built:
        return []
    # halves round up, as the per-minibatch share does (mixing.alignment_slots)
    answers = math.floor(cfg.share / (1 - cfg.share) * n_code + 0.5) if cfg.share < 1 else len(built) * cfg.samples_per_task
    chosen = list(built)
    random.Random(seed).shuffle(chosen)
    return chosen[: math.ceil(answers / cfg.samples_per_task)]


def answer(model, tokenizer, questions: list[AlignmentTask], rollout_cfg, cfg: AlignmentConfig, style: str, ids,
           greedy: bool = False, with_scores: bool = True, seed: int = 0) -> list[Trajectory]:
    """Sample the policy's answers to alignment questions as trajectories (kind "alignment"), with the
    same per-token log-probs, entropy and pooled hidden state as code rollouts, so they are tagged,
    gated and trained like any rollout. Their reward is `alignment_reward`; their outcome is `passed`
    for a fully right answer, `no_code` for one that does not parse, `wrong_answer` otherwise."""
    import torch

    from cosmocore.policy.interface import encode
    from cosmocore.rl.rollout import sample

    sampling = rollout_cfg.model_copy(update={"max_new_tokens": cfg.max_new_tokens})
    jobs = []
    for question in questions:
        prompt_ids = encode(model, tokenizer, alignment_chat_prompt(tokenizer, question.prompt_text, style), ANSWER_PREFIX)
        if len(prompt_ids) <= rollout_cfg.max_prompt_tokens:  # a program cut at the front makes no sense: skip
            jobs += [(question, prompt_ids, s) for s in range(1 if greedy else cfg.samples_per_task)]
    torch.manual_seed(seed)
    trajectories = []
    drawn = sample(model, tokenizer, [job[1] for job in jobs], sampling, style, greedy, rollout_cfg.temperature, with_scores,
                   stop=answer_complete)
    for (question, prompt, index), done in zip(jobs, drawn):
        text = ANSWER_PREFIX + tokenizer.decode(done.ids, skip_special_tokens=True)  # the answer as the model saw it
        reward = question.reward(text)
        trajectories.append(Trajectory(
            trajectory_id=f"{ids.run}/i{ids.iteration}/{question.alignment_id}/{index}",
            run=ids.run, variant=ids.variant, seed=ids.seed, iteration=ids.iteration,
            task_id=f"{question.task_id}#align", sample=index, kind="alignment",
            prompt_ids=list(prompt), completion_ids=list(done.ids), behaviour_logprobs=done.logprobs,
            mean_entropy=done.mean_entropy, hidden=done.hidden,
            text=text, code="",
            outcome="passed" if reward > 1 - 1e-9 else "no_code" if reward == 0.0 else "wrong_answer",
            hallucinated=False, hallucination_evidence="", exception_type="",
            test_share=(reward - FORMAT_CREDIT) / (1 - FORMAT_CREDIT) if reward > 0 else math.nan,
            reward=reward,
            extra={"alignment_id": question.alignment_id, "source_trajectory_id": question.source_trajectory_id,
                   "call": question.call},
        ))
    return trajectories
