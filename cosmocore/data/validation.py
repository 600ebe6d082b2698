"""Schema checks at stage boundaries, with Great Expectations, and the reference-solution check.

Every table that crosses a stage boundary (tasks after prepare, trajectories between rollout, tag,
gate and train) is validated here, and a failure names the offending rows by id, so a user can find
them. Great Expectations is imported inside the functions: importing it costs about 3 s, which
commands that never validate should not pay.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from cosmocore.config import SandboxConfig
from cosmocore.data.records import OUTCOMES, TRAJECTORY_COLUMNS, Task
from cosmocore.errors import CosmoCoreError
from cosmocore.sandbox.runner import ExecRequest, ExecResult, Sandbox

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
BENCHMARKS = ("humaneval", "bigcodebench")
TEST_STYLES = ("humaneval", "unittest")
TRAJECTORY_KINDS = ("code", "alignment")


class ValidationFailed(CosmoCoreError, ValueError):
    """A table failed its schema; the message lists the failed expectations, the ids, and what to do."""


@dataclass
class ValidationReport:
    """The outcome of one suite: `failures` are readable lines, `reasons` maps each bad id to the
    expectations its row failed (table-level failures, like a missing column, have no id)."""

    success: bool
    failures: list[str] = field(default_factory=list)
    bad_ids: set[str] = field(default_factory=set)
    reasons: dict[str, list[str]] = field(default_factory=dict)


def validate_tasks(frame_or_tasks: pd.DataFrame | Sequence[Task]) -> ValidationReport:
    """Unique ids, non-empty prompt and test, an identifier entry point, a known benchmark and test style."""
    import great_expectations.expectations as gxe

    frame = _tasks_frame(frame_or_tasks)
    expectations = [
        gxe.ExpectColumnValuesToBeUnique(column="task_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="task_id"),
        *[gxe.ExpectColumnValuesToNotBeNull(column=column) for column in ("prompt", "test")],
        *[gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1) for column in ("prompt", "test")],
        gxe.ExpectColumnValuesToNotBeNull(column="entry_point"),
        gxe.ExpectColumnValuesToMatchRegex(column="entry_point", regex=IDENTIFIER),
        gxe.ExpectColumnValuesToBeInSet(column="benchmark", value_set=list(BENCHMARKS)),
        gxe.ExpectColumnValuesToBeInSet(column="test_style", value_set=list(TEST_STYLES)),
    ]
    required = ["task_id", "benchmark", "prompt", "entry_point", "test", "test_style"]
    return _run_suite(frame, "tasks", "task_id", required, expectations)


def validate_trajectories(frame: pd.DataFrame) -> ValidationReport:
    """The trajectory table (`records.trajectories_to_frame`): all columns, known outcomes and kinds,
    rewards and affect in range. Affect columns are NaN before tagging, and nulls are not checked."""
    import great_expectations.expectations as gxe

    between = gxe.ExpectColumnValuesToBeBetween
    expectations = [
        gxe.ExpectColumnValuesToBeUnique(column="trajectory_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="trajectory_id"),
        gxe.ExpectColumnValuesToBeInSet(column="outcome", value_set=list(OUTCOMES)),
        gxe.ExpectColumnValuesToNotBeNull(column="outcome"),
        gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=list(TRAJECTORY_KINDS)),
        between(column="reward", min_value=-1.0, max_value=1.0),
        gxe.ExpectColumnValuesToNotBeNull(column="reward"),
        between(column="mean_entropy", min_value=0.0),
        between(column="test_share", min_value=0.0, max_value=1.0),
        *[between(column=column, min_value=-1.0, max_value=1.0) for column in ("valence", "valence_target")],
        *[between(column=column, min_value=0.0, max_value=1.0) for column in ("arousal", "arousal_target")],
    ]
    return _run_suite(frame, "trajectories", "trajectory_id", list(TRAJECTORY_COLUMNS), expectations)


def raise_for_failures(report: ValidationReport, what: str) -> None:
    """Raise `ValidationFailed` naming `what`, each failed expectation with its ids, and the fix."""
    if report.success:
        return
    raise ValidationFailed(
        f"{what} failed validation:\n  - "
        + "\n  - ".join(report.failures)
        + f"\nFix or remove the rows listed above (by id), or re-run the stage that wrote {what}; "
        "if the schema itself changed, update cosmocore/data/validation.py together with cosmocore/data/records.py."
    )


def check_reference_solutions(tasks: Sequence[Task], sandbox_cfg: SandboxConfig) -> dict[str, str]:
    """Run each task's reference program (prompt + canonical solution) against its own test in the
    sandbox; return {task_id: why it failed} for those that do not pass. A task whose reference
    fails cannot reward a correct program, so it must not be trained or evaluated on."""
    requests = [
        ExecRequest(
            task_id=task.task_id,
            program=task.reference_program,
            test=task.test,
            entry_point=task.entry_point,
            test_style=task.test_style,
        )
        for task in tasks
    ]
    with Sandbox(sandbox_cfg) as sandbox:
        results = sandbox.run(requests, progress=True)
    return {
        task.task_id: _describe_failure(result)
        for task, result in zip(tasks, results, strict=True)
        if not result.passed
    }


def _describe_failure(result: ExecResult) -> str:
    detail = result.outcome + (f" ({result.exception_type})" if result.exception_type else "")
    last_line = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "")
    return f"reference solution: {detail}" + (f": {last_line.strip()[:200]}" if last_line else "")


def _tasks_frame(frame_or_tasks: pd.DataFrame | Sequence[Task]) -> pd.DataFrame:
    if isinstance(frame_or_tasks, pd.DataFrame):
        return frame_or_tasks
    return pd.DataFrame([asdict(task) for task in frame_or_tasks], columns=[f for f in Task.__dataclass_fields__])


def _run_suite(
    frame: pd.DataFrame, name: str, id_column: str, required: list[str], expectations: list[Any]
) -> ValidationReport:
    """Validate `frame` against `expectations` (those on missing columns are replaced by one
    table-level failure) and collect the ids of the offending rows."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = frame.reset_index(drop=True)  # GX reports index labels; make them positions
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = gx.ExpectationSuite(name=name)
    suite.add_expectation(gxe.ExpectTableColumnsToMatchSet(column_set=required, exact_match=False))
    for expectation in expectations:
        if getattr(expectation, "column", None) in frame.columns:
            suite.add_expectation(expectation)
    result = batch.validate(suite, result_format="COMPLETE")

    report = ValidationReport(success=bool(result.success))
    for item in result.results:
        if not item.success:
            _record_failure(report, item, frame, id_column)
    return report


def _record_failure(report: ValidationReport, item: Any, frame: pd.DataFrame, id_column: str) -> None:
    config = item.expectation_config
    label = config.type + (f"({config.kwargs['column']})" if config.kwargs.get("column") else "")
    rows = item.result.get("unexpected_index_list") or []
    ids = [_row_id(frame, id_column, row) for row in rows]
    if ids:
        report.failures.append(f"{label}: {len(ids)} rows: {', '.join(sorted(set(ids)))}")
    else:
        missing = (item.result.get("details") or {}).get("mismatched", {}).get("missing")
        report.failures.append(f"{label}: " + (f"missing columns {missing}" if missing else "failed"))
    for row_id in dict.fromkeys(ids):
        report.bad_ids.add(row_id)
        report.reasons.setdefault(row_id, []).append(label)


def _row_id(frame: pd.DataFrame, id_column: str, row: int) -> str:
    value = frame[id_column].iloc[row] if id_column in frame.columns else None
    return f"row {row}" if value is None or pd.isna(value) or value == "" else str(value)
