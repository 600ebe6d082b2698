"""The records that cross stage boundaries: tasks (prepare → everything) and trajectories
(rollout → tag → gate → train). Both are stored as tables (jsonl for tasks, parquet for
trajectories) and their schemas are checked at each boundary by `cosmocore.data.validation`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd

from cosmocore.errors import CosmoCoreError
from cosmocore.files import atomic_path, write_frame

OUTCOMES = (
    "passed",
    "wrong_answer",
    "syntax_error",
    "runtime_error",
    "timeout",
    "memory_limit",
    "no_code",
    "sandbox_violation",
)


class RecordFileError(CosmoCoreError, ValueError):
    """A task or trajectory file that is missing, truncated or of another shape: the message names the
    file and how to write it again."""


@dataclass(frozen=True)
class Task:
    """One benchmark problem. The program under test is `prompt + completion`, run against `test`."""

    task_id: str
    benchmark: str  # humaneval | bigcodebench
    prompt: str  # the code the model continues: imports, signature, docstring
    instruction: str  # a natural-language statement of the task, for chat prompts
    entry_point: str
    test: str
    test_style: str  # humaneval (check(candidate)) | unittest (a unittest.TestCase)
    canonical_solution: str  # appended to `prompt`, it passes `test`
    libs: tuple[str, ...] = ()

    @property
    def reference_program(self) -> str:
        return self.prompt + self.canonical_solution


def write_tasks(tasks: list[Task], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp, tmp.open("w") as handle:
        for task in tasks:
            handle.write(json.dumps(asdict(task)) + "\n")


def read_tasks(path: str | os.PathLike) -> list[Task]:
    path = Path(path)
    if not path.is_file():
        raise RecordFileError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
    names = {f.name for f in fields(Task)}
    tasks = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            if set(row) != names:
                raise ValueError(f"expected fields {sorted(names)}, got {sorted(row)}")
            row["libs"] = tuple(row["libs"])
            tasks.append(Task(**row))
        except (ValueError, TypeError) as error:
            raise RecordFileError(f"{path}:{number}: corrupt task record ({error}); re-run `dvc repro prepare`") from None
    return tasks


@dataclass
class Trajectory:
    """One sampled program (or CodeRL+ alignment answer) with everything tag, gate and train need."""

    trajectory_id: str
    run: str
    variant: str
    seed: int
    iteration: int
    task_id: str
    sample: int
    kind: str  # code | alignment
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]  # per completion token, under the policy that sampled it
    mean_entropy: float
    hidden: list[float]  # pooled last hidden state of prompt + completion: the tagger's input
    text: str  # the decoded completion
    code: str  # the extracted program ("" when there is none)
    outcome: str
    hallucinated: bool
    hallucination_evidence: str
    exception_type: str
    test_share: float  # share of tests passed, NaN where the test format does not say
    reward: float
    valence_target: float = float("nan")
    arousal_target: float = float("nan")
    valence: float = float("nan")
    arousal: float = float("nan")
    extra: dict = field(default_factory=dict)


TRAJECTORY_COLUMNS = tuple(f.name for f in fields(Trajectory))


def trajectories_to_frame(trajectories: list[Trajectory]) -> pd.DataFrame:
    rows = []
    for trajectory in trajectories:
        row = asdict(trajectory)
        row["extra"] = json.dumps(row["extra"])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TRAJECTORY_COLUMNS))


def write_trajectories(trajectories: list[Trajectory], path: str | os.PathLike) -> None:
    write_frame(path, trajectories_to_frame(trajectories))


def read_table(path: str | os.PathLike, columns: tuple[str, ...], remake: str) -> pd.DataFrame:
    """The parquet table at `path`, which must hold `columns`. A missing, truncated or foreign file
    raises `RecordFileError` naming it and `remake`: what to do to have it written again."""
    import pyarrow

    path = Path(path)
    try:
        frame = pd.read_parquet(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise RecordFileError(f"{path} cannot be read ({type(error).__name__}: {error}): {remake}") from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise RecordFileError(f"{path} lacks the column(s) {', '.join(missing)}: it is not a table this "
                              f"version of CosmoCore wrote; {remake}")
    return frame


def read_samples_log(path: str | os.PathLike) -> pd.DataFrame:
    """A training run's samples_log.parquet (iteration, task, outcome, hallucinated per code sample)."""
    return read_table(path, ("iteration", "task_id", "outcome", "hallucinated"),
                      "delete it and re-run the run's train stage (`dvc repro`): a finished run writes it again "
                      "from its saved state")
