from cosmocore.data.records import Task
from cosmocore.policy.prompts import build_prompt, extract_code, is_complete, program_for

TASK = Task(
    task_id="t/0", benchmark="humaneval",
    prompt='from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """Add two numbers."""\n',
    instruction="Add two numbers.", entry_point="add", test="def check(candidate):\n    assert candidate(1, 2) == 3\n",
    test_style="humaneval", canonical_solution="    return a + b\n",
)


def test_fenced_block_is_extracted_and_prose_dropped():
    text = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nThis adds the numbers."
    assert extract_code(text, "chat") == "def add(a, b):\n    return a + b"


def test_truncated_fence_keeps_what_was_written():
    assert extract_code("```python\ndef add(a, b):\n    return a +", "chat") == "def add(a, b):\n    return a +"


def test_bare_function_with_trailing_prose():
    text = "def add(a, b):\n    return a + b\n\nThis function returns the sum."
    assert extract_code(text, "chat") == "def add(a, b):\n    return a + b"


def test_no_code_is_reported_as_empty():
    assert extract_code("I cannot help with that.", "chat") == ""
    assert program_for(TASK, "", "chat") == ""


def test_continuation_of_the_signature():
    code = extract_code("    return a + b\n\n\ndef unrelated():\n    pass\n", "completion")
    assert code == "    return a + b"
    program = program_for(TASK, code, "completion")
    assert program == TASK.prompt + "    return a + b\n"
    namespace: dict = {}
    exec(program, namespace)
    assert namespace["add"](1, 2) == 3


def test_full_definition_follows_the_prompt_and_keeps_its_imports():
    program = program_for(TASK, "def add(a: int, b: int) -> int:\n    return a + b", "chat")
    namespace: dict = {}
    exec(program, namespace)
    assert namespace["add"](2, 2) == 4 and "List" in namespace


def test_completeness_stops_generation():
    assert not is_complete("```python\ndef add(a, b):", "chat")
    assert is_complete("```python\ndef add(a, b):\n    return a + b\n```", "chat")
    assert is_complete("    return a + b\n\ndef other", "completion")


def test_chat_prompt_uses_the_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = build_prompt(TASK, tokenizer, "chat")
    assert "<|im_start|>user" in prompt and TASK.prompt in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert build_prompt(TASK, tokenizer, "completion") == TASK.prompt
