"""CodeRL+ alignment: test inputs, task construction through the real sandbox, the reward, prompts."""

from __future__ import annotations

import doctest
import json
import random

import pytest
from pydantic import ValidationError

from cosmocore.alignment import coderl as alignment
from cosmocore.alignment.coderl import (
    AlignmentTask,
    alignment_chat_prompt,
    alignment_prompt,
    alignment_reward,
    build_alignment_tasks,
    output_prediction_tasks,
)
from cosmocore.config import AlignmentConfig, load_params
from cosmocore.data.records import Task, Trajectory
from cosmocore.sandbox.runner import Sandbox

EXPECTED_STATS = dict.fromkeys(("built", *alignment.SKIPS), 0)


@pytest.fixture(scope="module")
def config():
    config = load_params("params.yaml")
    sandbox = config.sandbox.model_copy(update={"cpu_seconds": 1.0, "wall_seconds": 4.0, "workers": 2})
    return config.model_copy(update={"sandbox": sandbox})


@pytest.fixture(scope="module")
def sandbox(config):
    with Sandbox(config.sandbox) as pool:
        yield pool


def make_task(entry_point: str, test: str, task_id: str | None = None, solution: str = "") -> Task:
    prompt = f'def {entry_point}(n):\n    """Solve it."""\n'
    return Task(task_id or f"T/{entry_point}", "humaneval", prompt, "Solve it.", entry_point, test, "humaneval", solution)


def humaneval_test(*calls: str) -> str:
    return "def check(candidate):\n" + "".join(f"    assert candidate({call}) is not None\n" for call in calls)


def rollout(task: Task, code: str, outcome: str = "wrong_answer", sample: int = 0) -> Trajectory:
    return Trajectory(
        trajectory_id=f"run/i0/{task.task_id}/{sample}", run="run", variant="coderl_plus", seed=0, iteration=0,
        task_id=task.task_id, sample=sample, kind="code", prompt_ids=[1], completion_ids=[2], behaviour_logprobs=[-0.5],
        mean_entropy=0.5, hidden=[0.0], text=code, code=code, outcome=outcome, hallucinated=False,
        hallucination_evidence="", exception_type="", test_share=float("nan"), reward=0.0)


def build(rollouts: list[Trajectory], tasks: list[Task], sandbox, config, seed: int = 0, **changes):
    cfg = config.alignment.model_copy(update={"min_lines": 1, **changes})
    return build_alignment_tasks(rollouts, {task.task_id: task for task in tasks}, sandbox, cfg, seed, "chat")


def stats(**counts: int) -> dict[str, int]:
    return {**EXPECTED_STATS, **counts}


# ------------------------------------------------------------------------------------ test inputs


def test_inputs_from_humaneval_asserts_keep_literal_calls_in_order():
    test = """
def check(candidate):
    assert candidate([1, 2], 3) == [4]
    assert abs(candidate((1.5,), -2) - 0.5) < 1e-6
    assert candidate([1, 2], 3) == [4]
    x = [9]
    assert candidate(x, 1) == [10]
    assert candidate(*[1, 2]) is None
    assert candidate(sorted([3]), 1) == [4]
    assert candidate({'a': {1, 2}}, n=None) == {}
"""
    assert alignment.test_inputs(make_task("f", test)) == ["f([1, 2], 3)", "f((1.5,), -2)", "f({'a': {1, 2}}, n=None)"]


def test_inputs_from_unittest_methods_call_the_entry_point():
    test = """
import unittest
import pandas as pd
class TestCases(unittest.TestCase):
    def setUp(self):
        self.df = pd.DataFrame({'a': [1]})
    def test_literal(self):
        self.assertEqual(task_func('abc', k=2), 3)
    def test_frame(self):
        task_func(self.df)
    def test_default(self):
        self.assertIsInstance(task_func(), dict)
"""
    assert alignment.test_inputs(make_task("task_func", test)) == ["task_func('abc', k=2)", "task_func()"]


def test_inputs_of_an_unparsable_test_name_the_task():
    with pytest.raises(ValueError, match="T/f: its test code does not parse"):
        alignment.test_inputs(make_task("f", "def check(candidate):\n    assert candidate(1 ==\n"))


# ------------------------------------------------------------------------------- task construction

LOOP = """
def total(n):
    acc = 0
    for i in range(n):
        acc += i * i
    label = f'sum={acc}'
    return acc
"""
RECURSION = """
def fact(n):
    if n <= 1:
        return 1
    rest = fact(n - 1)
    result = n * rest
    return result
"""
CONTAINERS = """
def group(words):
    seen = {len(word) for word in words}
    pair = (min(seen), max(seen))
    index = {word: len(word) for word in words}
    return sorted(index.items())
"""


def test_tasks_from_loops_recursion_and_containers(sandbox, config):
    total = make_task("total", humaneval_test("4"))
    fact = make_task("fact", humaneval_test("5"))
    group = make_task("group", humaneval_test("['ab', 'c', 'ab']"))
    rollouts = [rollout(total, LOOP), rollout(fact, RECURSION), rollout(group, CONTAINERS)]
    built, counts = build(rollouts, [total, fact, group], sandbox, config)
    assert counts == stats(built=3)
    by_task = {task.task_id: task for task in built}
    loop = by_task["T/total"]
    assert (loop.call, loop.expected_output, loop.expected_variables) == ("total(4)", 14, {"i": 3, "acc": 14, "label": "sum=14"})
    assert loop.source_trajectory_id == "run/i0/T/total/0" and LOOP.strip() in loop.program
    # the outermost call is traced, not the recursive ones
    assert by_task["T/fact"].expected_variables == {"rest": 24, "result": 120}
    # sets become sorted lists, tuples lists, in the order the locals were last assigned
    assert by_task["T/group"].expected_variables == {"seen": [1, 2], "pair": [1, 2], "index": {"ab": 2, "c": 1}}
    assert by_task["T/group"].expected_output == [["ab", 2], ["c", 1]]
    for task in built:
        assert task.reward(json.dumps({"output": task.expected_output, "variables": task.expected_variables})) == 1.0


def test_failing_runs_are_skipped_and_counted(sandbox, config):
    raises = make_task("boom", humaneval_test("1"))
    spins = make_task("spin", humaneval_test("1"))
    untestable = make_task("free", "def check(candidate):\n    x = 1\n    assert candidate(x)\n")
    rollouts = [
        rollout(raises, "def boom(n):\n    items = []\n    return items[n]\n"),
        rollout(spins, "def spin(n):\n    while True:\n        n += 1\n"),
        rollout(raises, "def boom(n) return\n", outcome="syntax_error", sample=1),  # never traced
        rollout(spins, "def spin(n):\n    while n: pass\n", outcome="timeout", sample=1),  # never traced
        rollout(untestable, "def free(n):\n    return n\n"),
    ]
    built, counts = build(rollouts, [raises, spins, untestable], sandbox, config)
    assert built == []
    assert counts == stats(skipped_error=2, skipped_timeout=2, skipped_no_input=1)


def test_values_that_are_not_json_are_normalised_or_dropped(sandbox, config):
    task = make_task("odd", humaneval_test("3"))
    code = """
import numpy as np
class Box:
    pass
def odd(n):
    box = Box()
    big = 2 ** 64
    count = np.int64(n)
    name = 'box' * n
    return [n, float(n) / 2]
"""
    built, counts = build([rollout(task, code)], [task], sandbox, config, max_variables=5)
    assert counts == stats(built=1)
    assert (built[0].expected_output, built[0].expected_variables) == ([3, 1.5], {"name": "boxboxbox"})
    assert '{"output": ..., "variables": {"name": ...}}' in built[0].prompt_text
    returns_object = "class Box:\n    pass\ndef odd(n):\n    size = n + 1\n    return Box()\n"
    assert build([rollout(task, returns_object)], [task], sandbox, config)[1] == stats(skipped_incomparable=1)


def test_huge_values_are_not_asked(sandbox, config):
    task = make_task("huge", humaneval_test("300"))
    code = "def huge(n):\n    text = 'x' * n\n    squares = [i * i for i in range(n)]\n    size = len(squares)\n    return size\n"
    built, counts = build([rollout(task, code)], [task], sandbox, config, max_value_chars=200)
    assert counts == stats(built=1)
    assert (built[0].expected_output, built[0].expected_variables) == (300, {"size": 300})
    returns_huge = "def huge(n):\n    count = n\n    return list(range(n))\n"
    assert build([rollout(task, returns_huge)], [task], sandbox, config)[1] == stats(skipped_incomparable=1)
    returns_nothing = "def huge(n):\n    print(n)\n"
    assert build([rollout(task, returns_nothing)], [task], sandbox, config)[1] == stats(skipped_incomparable=1)


def test_randomness_duplicates_complexity_and_source(sandbox, config):
    task = make_task("pick", humaneval_test("5"))
    random_code = "import random\ndef pick(n):\n    value = random.random()\n    return value\n"
    one_liner = "def pick(n):\n    return n + 1\n"
    steady = "def pick(n):\n    half = n // 2\n    return half\n"
    rollouts = [rollout(task, random_code), rollout(task, one_liner, sample=1), rollout(task, steady, sample=2),
                rollout(task, steady, sample=3), rollout(task, steady, outcome="passed", sample=4)]
    built, counts = build(rollouts, [task], sandbox, config, min_lines=2)
    assert counts == stats(built=1, skipped_nondeterministic=1, skipped_complexity=1, skipped_duplicate=1)
    assert built[0].source_trajectory_id.endswith("/2")
    passed_only = [rollout(task, steady, outcome="passed")]
    assert build(passed_only, [task], sandbox, config)[1] == stats()
    assert build(passed_only, [task], sandbox, config, source="all")[1] == stats(built=1)


def test_construction_and_traces_are_deterministic(sandbox, config):
    task = make_task("total", humaneval_test("3", "4", "5", "6", "7"))
    rollouts = [rollout(task, LOOP), rollout(task, LOOP.replace("i * i", "i + i"), sample=1)]
    first, _ = build(rollouts, [task], sandbox, config, seed=3)
    again, _ = build(rollouts, [task], sandbox, config, seed=3)
    assert first == again
    calls = {seed: [t.call for t in build(rollouts, [task], sandbox, config, seed=seed)[0]] for seed in range(6)}
    assert len({tuple(c) for c in calls.values()}) > 1, "the seed picks the input"
    traces = [sandbox.trace(LOOP, "total(6)", max_vars=3) for _ in range(3)]
    assert all((t.outcome, t.output, t.variables, t.lines) == (traces[0].outcome, traces[0].output, traces[0].variables,
                                                                 traces[0].lines) for t in traces)


def test_unknown_task_is_a_clear_error(sandbox, config):
    task = make_task("total", humaneval_test("3"))
    with pytest.raises(ValueError, match="not among the tasks given"):
        build([rollout(task, LOOP)], [], sandbox, config)


def test_output_prediction_from_reference_solutions(sandbox, config):
    body = "    acc = 0\n    for i in range(n):\n        acc += i\n    return acc\n"
    tasks = [make_task(f"f{k}", humaneval_test(str(k + 2)), solution=body) for k in range(4)]
    tasks.insert(1, make_task("g", humaneval_test("1"), solution="    return None\n"))  # nothing to predict
    built = output_prediction_tasks(tasks, sandbox, config.alignment.model_copy(update={"eval_tasks": 3}))
    assert [(t.task_id, t.call, t.expected_output, t.expected_variables) for t in built] == [
        ("T/f0", "f0(2)", 1, {}), ("T/f1", "f1(3)", 3, {}), ("T/f2", "f2(4)", 6, {})]
    assert built[0].source_trajectory_id == "" and '{"output": ...}' in built[0].prompt_text
    assert built[0].reward('{"output": 1}') == 1.0 and built[0].reward('{"output": 2}') == 0.1


# ------------------------------------------------------------------------------------------ reward

EXPECTED_VARIABLES = {"acc": 14, "ratio": 0.5, "names": ["a", "b"], "seen": {"x": 1, "y": [2, 3]}}


def answer(output, variables) -> str:
    return json.dumps({"output": output, "variables": variables})


def test_reward_exact_partial_and_tolerant():
    exact = answer(14, EXPECTED_VARIABLES)
    assert alignment_reward(exact, 14, EXPECTED_VARIABLES) == 1.0
    reordered = answer(14.0, {"seen": {"y": (2, 3), "x": 1}, "names": ["a", "b"], "ratio": 0.5000000001, "acc": 14})
    assert alignment_reward(reordered, 14, EXPECTED_VARIABLES) == 1.0
    two_of_five = answer(14, {"acc": 14, "ratio": 0.4, "names": ["b", "a"], "seen": {"x": 1}})
    assert alignment_reward(two_of_five, 14, EXPECTED_VARIABLES) == pytest.approx(0.1 + 0.9 * 2 / 5)
    assert alignment_reward(answer(None, {}), 14, EXPECTED_VARIABLES) == 0.1
    assert alignment_reward(answer(True, {}), 1, {}) == 0.1  # a boolean is not the number 1


@pytest.mark.parametrize("text", [
    "", "14", "[14]", "```json\n{\"output\": 14,\n```", '{"variables": {"acc": 14}}', '{"output": 14, "variables": 7}',
    '{"output": 14}',  # variables were asked for
    "{'output': 14, 'variables': {}}",  # a Python dict, not JSON
])
def test_reward_of_malformed_answers_is_zero(text):
    assert alignment_reward(text, 14, {"acc": 14}) == 0.0


def test_reward_reads_fenced_and_embedded_answers():
    fenced = 'The loop adds squares {0, 1, 4}.\n```json\n{"output": 14, "variables": {"acc": 14}}\n```'
    assert alignment_reward(fenced, 14, {"acc": 14}) == 1.0
    assert alignment_reward('Answer: {"output": 14, "variables": {"acc": 14}} done', 14, {"acc": 14}) == 1.0


def test_hedging_never_beats_the_correct_items_alone():
    """Extra keys, candidate lists and wrong guesses never score above the same answer holding only its
    correct items, over many random answers."""
    rng = random.Random(0)
    wrong = {"acc": 13, "ratio": 0.25, "names": ["a"], "seen": {"x": 2}}
    for _ in range(300):
        output = rng.choice([14, [14, 13], [13, 14], 13])
        variables = {}
        for name, value in EXPECTED_VARIABLES.items():
            choice = rng.choice(["right", "wrong", "candidates", "missing"])
            if choice != "missing":
                variables[name] = {"right": value, "wrong": wrong[name], "candidates": [value, wrong[name]]}[choice]
        hedged = {**variables, **{f"extra{k}": 14 for k in range(rng.randint(0, 3))}}
        honest = {name: value for name, value in variables.items() if value == EXPECTED_VARIABLES[name]}
        honest_output = output if output == 14 else None
        score = alignment_reward(json.dumps({"output": output, "variables": hedged, "guesses": [14, 13]}), 14, EXPECTED_VARIABLES)
        assert score <= alignment_reward(answer(honest_output, honest), 14, EXPECTED_VARIABLES)


def test_doctest_examples():
    assert doctest.testmod(alignment).failed == 0


# ----------------------------------------------------------------------------------- prompts, config


class ChatTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "<user>" + messages[0]["content"] + "<assistant>"


def test_prompts_show_code_call_and_variables():
    text = alignment_prompt(LOOP, "total(4)", ["acc", "label"])
    assert LOOP.strip() in text and "`total(4)`" in text
    assert '{"output": ..., "variables": {"acc": ..., "label": ...}}' in text and "acc, label of `total`" in text
    assert alignment_chat_prompt(ChatTokenizer(), text, "chat") == f"<user>{text}<assistant>"
    assert alignment_chat_prompt(None, text, "completion") == f"{text}\n\n"
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        alignment_chat_prompt(None, text, "auto")
    assert isinstance(AlignmentTask("a", "t", "", LOOP, "total(4)", 14, {}, text).reward("{}"), float)


def test_alignment_config_rejects_an_empty_line_band(config):
    values = {**config.alignment.model_dump(), "min_lines": 10, "max_lines": 5}
    with pytest.raises(ValidationError, match="min_lines"):
        AlignmentConfig.model_validate(values)

