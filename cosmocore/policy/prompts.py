"""Prompts and code extraction.

Instruct models get a chat prompt through their tokenizer's chat template and answer with a fenced
block; base models continue the task's code prompt. `program_for` turns whatever the model wrote into
the whole program the sandbox runs (the task's prompt, which carries its imports and helpers, plus the
model's code), or "" when there is no code at all: that is a `no_code` sample, reported as such.
"""

from __future__ import annotations

import ast
import re

from cosmocore.data.records import Task

CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in a single "
    "```python code block.\n\n```python\n{prompt}```"
)
FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Where a continuation stops: the next top-level statement that is not part of the function.
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")


def resolve_style(style: str, tokenizer) -> str:
    if style != "auto":
        return style
    return "chat" if getattr(tokenizer, "chat_template", None) else "completion"


def build_prompt(task: Task, tokenizer, style: str) -> str:
    if style == "chat":
        messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=task.prompt)}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return task.prompt


def is_complete(text: str, style: str) -> bool:
    """True once the generated text holds a whole program: generation of that sample can stop."""
    if style == "chat":
        return text.count("```") >= 2
    return any(stop in text for stop in COMPLETION_STOPS)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _trim_prose(code: str) -> str:
    """Drop trailing lines (prose after unfenced code) until the rest parses; keep it all if nothing does."""
    lines = code.rstrip().splitlines()
    for end in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:end])
        if _parses(candidate):
            return candidate.rstrip()
    return code


def extract_code(text: str, style: str) -> str:
    """The code in a model's answer: the first fenced block (closed or truncated), else the text itself
    when it looks like code, with trailing prose cut off. Returns "" when there is no code."""
    if style == "completion":
        for stop in COMPLETION_STOPS:
            text = text.split(stop)[0]
        return text.rstrip()
    match = FENCE.search(text)
    if match:
        return match.group(1).strip("\n")
    stripped = text.strip()
    if re.match(r"(def |class |import |from |@|    )", stripped):
        return _trim_prose(stripped)
    return ""


def program_for(task: Task, code: str, style: str) -> str:
    """The whole program to execute. A continuation or a body-only answer extends the prompt's
    signature; an answer with its own definitions follows the prompt, whose function (a docstring
    only) it replaces, so the prompt's imports and helper functions stay in scope."""
    if not code.strip():
        return ""
    if style == "completion" or code.startswith((" ", "\t")):
        return task.prompt + code + "\n"
    return task.prompt.rstrip() + "\n\n\n" + code + "\n"


# ------------------------------------------------------------------------------------------ self-repair
REPAIR_INSTRUCTION = ("Running it failed:\n{feedback}\n\nFix the function. Reply with the complete corrected "
                      "function in a single ```python code block.")
FEEDBACK_LINES, FEEDBACK_CHARS = 8, 600


def error_feedback(outcome: str, stderr: str = "", failing_test: str = "", exception_type: str = "") -> str:
    """What a failing sample's execution said, trimmed to what a small model can use: the failing
    assertion for a wrong answer, the end of the traceback for an error, a plain sentence otherwise."""
    if outcome == "no_code":
        return "The answer contained no Python code."
    if outcome == "timeout":
        return "The code timed out: it runs too long or never ends."
    if outcome == "memory_limit":
        return "The code ran out of memory."
    if outcome == "sandbox_violation":
        return "The code tampered with the test harness instead of solving the task."
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if outcome == "wrong_answer" and failing_test:
        last = lines[-1].strip() if lines else ""
        detail = f" ({last})" if last and last != "AssertionError" and "Error" in last else ""
        return f"This test failed: {failing_test}{detail}"
    tail = [line for line in lines if not line.startswith("Traceback (most recent call last)")][-FEEDBACK_LINES:]
    text = "\n".join(tail) or (exception_type or outcome.replace("_", " "))
    return text[-FEEDBACK_CHARS:]


def repair_prompt(task: Task, code: str, text: str, feedback: str, tokenizer, style: str) -> str:
    """Ask for a fix: the task, the failing attempt and what running it said. Only the latest attempt is
    shown (not the whole history), so the prompt stays bounded round after round."""
    if style == "chat":
        answer = f"```python\n{code}\n```" if code else text.strip()
        messages = [
            {"role": "user", "content": CHAT_INSTRUCTION.format(prompt=task.prompt)},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": REPAIR_INSTRUCTION.format(feedback=feedback)},
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    attempt = program_for(task, code, style) or task.prompt
    comment = "\n".join("# " + line for line in feedback.splitlines())
    return f"{attempt.rstrip()}\n\n\n# The code above fails:\n{comment}\n# A corrected version:\n\n\n{task.prompt}"
