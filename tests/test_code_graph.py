"""The code's import graph, function-level imports included: the package has no import cycle, and
`dvc.yaml` cannot go stale, every stage depending on every file of ours its command runs.

The command's entry module is followed through every `import` of `cosmocore`/`flows` it contains,
function-level ones included, transitively, plus the scripts the code runs by path (a string literal
naming a `.py` file beside the module, e.g. `sandbox/worker.py`). A stage whose `deps` miss one of them
would keep old outputs standing after that file changed."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OURS = ("cosmocore", "flows")


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(file: Path) -> set[Path]:
    """Our files that `file` imports anywhere in its body, or runs by path."""
    tree = ast.parse(file.read_text(), filename=str(file))
    package = ".".join(file.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"\w+\.py", node.value):
            script = file.with_name(node.value)
            if script.is_file():
                names.add(".".join(script.relative_to(ROOT).with_suffix("").parts))
    files = set()
    for name in names:
        if name.split(".")[0] not in OURS:
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            found = module_file(".".join(parts[:depth]))
            if found is not None:
                files.add(found)
    return files


def closure(entry: Path) -> set[Path]:
    seen, todo = set(), [entry]
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(imported_files(file) - seen)
    return seen


def entry_module(cmd: str) -> Path:
    """The module a stage's command runs: `python -m flows <stage>` runs `flows/<stage>.py` (through
    `flows/__main__.py`), `python -m pkg.mod` runs it directly, `cosmocore ...` runs the CLI."""
    words = cmd.split()
    if words[:3] == ["python", "-m", "flows"]:
        return ROOT / "flows" / f"{words[3]}.py"
    if words[:2] == ["python", "-m"]:
        return module_file(words[2])
    if words[0] == "cosmocore":
        return ROOT / "cosmocore" / "cli.py"
    raise AssertionError(f"unknown command shape: {cmd}")


def covered(file: Path, deps: list[str]) -> bool:
    return any(file == ROOT / dep or (ROOT / dep) in file.parents for dep in deps)


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_depends_on_the_code_it_runs(name):
    stage = STAGES[name]
    entry = entry_module(stage["cmd"])
    needed = closure(entry) | (closure(ROOT / "flows" / "__main__.py") if "-m flows " in stage["cmd"] else set())
    missing = sorted(str(f.relative_to(ROOT)) for f in needed if not covered(f, stage.get("deps", [])))
    assert not missing, f"stage {name} runs {missing} but does not depend on them: add them to its deps in dvc.yaml"


def test_the_import_walk_sees_function_level_imports_and_scripts():
    found = {str(f.relative_to(ROOT)) for f in closure(ROOT / "cosmocore" / "sandbox" / "runner.py")}
    assert "cosmocore/sandbox/worker.py" in found  # run by path, never imported
    found = {str(f.relative_to(ROOT)) for f in imported_files(ROOT / "cosmocore" / "policy" / "family.py")}
    assert {"cosmocore/policy/causal.py", "cosmocore/policy/seq2seq.py"} <= found  # imported inside functions


def cycles(files: list[Path]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), as paths relative to the repository."""
    graph = {file: imported_files(file) for file in files}
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    found: list[list[str]] = []

    def visit(node: Path) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in graph:
                continue
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(str(f.relative_to(ROOT)) for f in group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    files = [f for f in (ROOT / "cosmocore").rglob("*.py") if f.name != "__init__.py"]
    assert not cycles(files), "modules that import each other (at any depth, inside functions too): " + str(cycles(files))


def test_the_cycle_finder_finds_one(tmp_path, monkeypatch):
    package = tmp_path / "cosmocore"
    package.mkdir()
    (package / "a.py").write_text("def f():\n    from cosmocore import b\n")
    (package / "b.py").write_text("from cosmocore.a import f\n")
    (package / "c.py").write_text("import cosmocore.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert cycles(sorted(package.glob("*.py"))) == [["cosmocore/a.py", "cosmocore/b.py"]]
