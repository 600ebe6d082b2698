"""The static half of the hallucination flag: what a program refers to that does not exist.

Three kinds of evidence, all found without running the program (see docs/design.md, "Hallucinated"):
undefined names (pyflakes, which already knows the builtins and every name the program binds),
imports of modules this interpreter cannot find (it is also the sandbox's interpreter, so "cannot be
found here" means "cannot be imported there"), and attributes or imported names a module does not
have. Modules are imported only when they are known to be safe to import on the host (the standard
library, numpy, pandas); anything else is checked for existence only, never executed.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import importlib.util
import sys
import types
import warnings

from pyflakes import checker, messages

SAFE_TO_IMPORT = (set(sys.stdlib_module_names) | {"numpy", "pandas"}) - {
    # standard modules with side effects on import (a browser, a printed poem, a display)
    "antigravity", "this", "turtle", "turtledemo", "tkinter", "idlelib", "__hello__", "__phello__",
}
IMPORT_GUARDS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def static_hallucinations(program: str) -> list[str]:
    """Evidence strings such as "static: undefined name 'foo'"; empty when nothing is found or the
    program does not parse (a syntax error is an outcome of its own, not a hallucination)."""
    return list(_static_hallucinations(program))


@functools.lru_cache(maxsize=4096)  # the same program is checked again across iterations and repairs
def _static_hallucinations(program: str) -> tuple[str, ...]:
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError):
        return ()
    evidence = _undefined_names(tree)
    guarded = _guarded_imports(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded:
            evidence += _missing_imports(node)
    evidence += _missing_module_attributes(tree)
    return tuple(dict.fromkeys(evidence))  # unique, in order of discovery


def _undefined_names(tree: ast.Module) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = checker.Checker(tree, filename="<program>").messages
    return [
        f"static: undefined name {message.message_args[0]!r}"
        for message in found
        if isinstance(message, messages.UndefinedName) and not hasattr(builtins, message.message_args[0])
    ]


def _guarded_imports(tree: ast.Module) -> set[int]:
    """Imports inside `try: ... except ImportError:` are optional by design, not hallucinated."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(handler) for handler in node.handlers):
            guarded |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return guarded


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    caught = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(kind, ast.Name) and kind.id in IMPORT_GUARDS for kind in caught)


def _missing_imports(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [f"static: no module named {alias.name!r}" for alias in node.names if not _module_exists(alias.name)]
    if node.level or not node.module:
        return []  # relative imports: the sample is a single module, pyflakes-level concerns only
    if not _module_exists(node.module):
        return [f"static: no module named {node.module!r}"]
    return [
        f"static: cannot import name {alias.name!r} from {node.module!r}"
        for alias in node.names
        if alias.name != "*" and _module_lacks(node.module, alias.name)
    ]


@functools.lru_cache(maxsize=None)
def _module_exists(name: str) -> bool:
    """Top-level packages by lookup only; submodules only below safe packages (finding a
    submodule imports its parents)."""
    top = name.partition(".")[0]
    try:
        if importlib.util.find_spec(top) is None:
            return False
        return top not in SAFE_TO_IMPORT or name == top or importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def _safe_module(name: str) -> types.ModuleType | None:
    if name.partition(".")[0] not in SAFE_TO_IMPORT:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a safe module that fails to import here says nothing about the sample
        return None


@functools.lru_cache(maxsize=None)
def _module_lacks(module_name: str, attribute: str) -> bool:
    """True only when a safe module has neither the attribute nor a submodule of that name."""
    module = _safe_module(module_name)
    if module is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(module, attribute):
            return False
    return not _module_exists(f"{module_name}.{attribute}")


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Names bound to a module by an import and by nothing else (a rebound name proves nothing)."""
    imported: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name, module = (alias.asname, alias.name) if alias.asname else (alias.name.partition(".")[0],) * 2
                imported.setdefault(name, set()).add(module)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                module = f"{node.module}.{alias.name}"
                if isinstance(_safe_module_attribute(node.module, alias.name), types.ModuleType):
                    imported.setdefault(alias.asname or alias.name, set()).add(module)
    rebound = _names_bound_otherwise(tree)
    return {name: modules.pop() for name, modules in imported.items() if len(modules) == 1 and name not in rebound}


def _safe_module_attribute(module_name: str, attribute: str):
    module = _safe_module(module_name)
    return getattr(module, attribute, None) if module is not None else None


def _names_bound_otherwise(tree: ast.Module) -> set[str]:
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return bound


def _missing_module_attributes(tree: ast.Module) -> list[str]:
    """`math.foo`, `np.linalg.nrom`: follow each attribute chain while it stays on modules."""
    aliases = _module_aliases(tree)
    if not aliases:
        return []
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    evidence = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and id(node) not in inner:
            chain = _attribute_chain(node)
            if chain and chain[0] in aliases:
                evidence += _first_missing(aliases[chain[0]], chain[1:])
    return evidence


def _attribute_chain(node: ast.Attribute) -> list[str]:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else []


def _first_missing(module_name: str, attributes: list[str]) -> list[str]:
    for attribute in attributes:
        if _module_lacks(module_name, attribute):
            return [f"static: module {module_name!r} has no attribute {attribute!r}"]
        value = _safe_module_attribute(module_name, attribute)
        if not isinstance(value, types.ModuleType):
            return []
        module_name = value.__name__
    return []
