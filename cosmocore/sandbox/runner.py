"""The sandbox's front: `Sandbox` runs untrusted, model-written programs against their tests, and
traces calls, on this machine's warm jailed pools (`pools.py`, which says how a sample is isolated and
classified) or on a Dask cluster's (`distributed.py`); `run_jsonl` is `cosmocore exec`.
"""

from __future__ import annotations

import ast
import json
import math
import os
from collections import Counter
from pathlib import Path

from cosmocore.config import DASK_ADDRESS_ENV, SandboxConfig
from cosmocore.sandbox.pools import ExecRequest, ExecResult, LocalPools, SandboxError, TraceResult
from cosmocore.sandbox.static_check import static_hallucinations

__all__ = ["ExecRequest", "ExecResult", "TraceResult", "Sandbox", "SandboxError", "run_jsonl",
           "static_hallucinations", "detect_test_style"]


class Sandbox:
    """The sandbox: executes requests, and traces calls, in jails. Use as a context manager, or call close().

    The work goes to this machine's warm pools (`LocalPools`), or, given the address of a Dask scheduler
    (`sandbox.dask_address`, or the environment variable COSMOCORE_DASK_ADDRESS, which wins when set,
    even to ""), to the pools each worker of that cluster keeps (`cosmocore.sandbox.distributed`,
    imported only then). `size` is how many samples run at once; `slot` applies to the local pools."""

    def __init__(self, config: SandboxConfig, slot: int = 0):
        self.config = config
        address = os.environ.get(DASK_ADDRESS_ENV, config.dask_address)
        if address:
            from cosmocore.sandbox.distributed import DaskPools

            self._pools: LocalPools | DaskPools = DaskPools(config, address)
        else:
            self._pools = LocalPools(config, slot)
        self.size = self._pools.size

    @property
    def isolation(self) -> str:
        return self._pools.isolation

    def run(self, requests: list[ExecRequest], progress: bool = False) -> list[ExecResult]:
        """Execute every request; results come back in the order of `requests`."""
        return self._pools.run(requests, progress)

    def trace(self, program: str, call: str, max_vars: int = 3, max_chars: int = 200) -> TraceResult:
        """Run `program`, then evaluate `call` (e.g. "f(3)") under a tracer, in the jail."""
        return self._pools.trace(program, call, max_vars, max_chars)

    def close(self) -> None:
        self._pools.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ----------------------------------------------------------------------------- jsonl entry point


def detect_test_style(test: str) -> str:
    """unittest when the test source defines a unittest.TestCase subclass, else humaneval."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError):
        return "unittest" if "TestCase" in test else "humaneval"
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                if name == "TestCase":
                    return "unittest"
    return "humaneval"


def _request_from_line(line: str) -> ExecRequest:
    """Parse one input line; raise ValueError with a message the user can act on."""
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    missing = [key for key in ("task_id", "test", "entry_point") if not isinstance(row.get(key), str)]
    if missing:
        raise ValueError(f"missing or non-string field(s) {missing}")
    if isinstance(row.get("code"), str):
        program = row["code"]
    elif isinstance(row.get("completion"), str):
        program = str(row.get("prompt") or "") + row["completion"]
    else:
        raise ValueError("needs 'code' (the whole program) or 'completion' (appended to 'prompt')")
    style = row.get("test_style") or detect_test_style(row["test"])
    if style not in ("humaneval", "unittest"):
        raise ValueError(f"test_style is {style!r}; use humaneval or unittest, or leave it out")
    return ExecRequest(row["task_id"], program, row["test"], row["entry_point"], style)


def _malformed(number: int, line: str, error: Exception) -> ExecResult:
    try:
        task_id = str(json.loads(line).get("task_id") or f"line {number}")
    except (ValueError, AttributeError):
        task_id = f"line {number}"
    return ExecResult(task_id, "no_code", False, False, [], False, False, "MalformedInput", "",
                      f"input line {number}: {error}", math.nan, 0.0, 0.0)


def run_jsonl(in_path: str | os.PathLike, out_path: str | os.PathLike, config: SandboxConfig) -> dict[str, int]:
    """`cosmocore exec SAMPLES.jsonl --out RESULTS.jsonl`: one result line per input line, in order;
    a malformed line gets its own MalformedInput result and the run goes on. Returns counts by outcome."""
    slots: list[ExecResult | ExecRequest] = []
    for number, line in enumerate(Path(in_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            slots.append(_request_from_line(line))
        except (ValueError, TypeError) as error:
            slots.append(_malformed(number, line, error))
    requests = [slot for slot in slots if isinstance(slot, ExecRequest)]
    with Sandbox(config) as sandbox:
        executed = iter(sandbox.run(requests, progress=len(requests) > 50))
    results = [next(executed) if isinstance(slot, ExecRequest) else slot for slot in slots]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as handle:
        for result in results:
            handle.write(json.dumps(result.to_dict()) + "\n")
    return dict(Counter(result.outcome for result in results))
