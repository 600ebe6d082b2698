"""Execution on a Dask cluster: the sandbox's requests fan out over the workers of a Dask scheduler.

    Sandbox.run ──chunks──► Dask scheduler ──► Dask worker: LocalPools (one jailed worker per thread)
                                          └──► Dask worker: LocalPools ...

Each Dask worker keeps warm pools of its own (`pools.LocalPools`, jailed exactly as on one machine),
started on the first chunk it is sent and closed when the worker closes (a Dask WorkerPlugin). It has
one jailed worker per Dask thread (`dask worker --nthreads N`, by default the worker's share of its
machine's cores), so Dask's own sizing sizes the sandbox and `sandbox.workers` applies to local pools
only. The Dask workers need the project installed (they unpickle its functions and results) and,
for the full jail, bubblewrap. `trace` goes the same way as `run`, so a sandbox given an address
starts no jailed worker on the calling machine.
"""

from __future__ import annotations

import fcntl
import itertools
import math
import os
import threading

from distributed import Client, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from cosmocore.config import DASK_ADDRESS_ENV, SandboxConfig
from cosmocore.sandbox.pools import ExecRequest, ExecResult, LocalPools, SandboxError, TraceResult

CONNECT_SECONDS = 5
WORKERS_WAIT_SECONDS = 30
# A chunk of requests is one Dask task. Four chunks per jailed worker balance the load (a chunk of
# slow samples does not hold up the end) at a few milliseconds of scheduling each: docs/measurements.md.
CHUNKS_PER_THREAD = 4
PLUGIN_NAME = "cosmocore-sandbox"
SLOT_LOCKS = "/tmp/cosmocore-sandbox-slot-{}.lock"


class DaskPools:
    """The `Sandbox` of a Dask cluster: connects on construction, and fails fast, saying what to start
    or clear, when the scheduler cannot be reached or has no workers."""

    def __init__(self, config: SandboxConfig, address: str):
        self.config = config.model_copy(update={"dask_address": ""})
        unset = f"or clear sandbox.dask_address / {DASK_ADDRESS_ENV} to run on this machine"
        try:
            self.client = Client(address, timeout=CONNECT_SECONDS, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as error:
            raise SandboxError(
                f"sandbox: cannot reach the Dask scheduler at {address!r} ({error}): start one there "
                f"(`dask scheduler`) and its workers (`dask worker {address}`), {unset}") from None
        try:
            self.client.wait_for_workers(1, timeout=WORKERS_WAIT_SECONDS)
        except TimeoutError:
            self.client.close()
            raise SandboxError(f"sandbox: the Dask scheduler at {address!r} has had no worker for "
                               f"{WORKERS_WAIT_SECONDS} s: start one (`dask worker {address}`), {unset}") from None
        self.client.register_plugin(_WorkerPools())
        self.size = sum(self.client.nthreads().values())
        self._isolation: str | None = None

    @property
    def isolation(self) -> str:
        """The isolation in force on the workers (several, comma-separated, if they differ)."""
        if self._isolation is None:
            self._isolation = ",".join(sorted(set(self.client.run(_isolation, self.config).values())))
        return self._isolation

    def run(self, requests: list[ExecRequest], progress: bool = False) -> list[ExecResult]:
        size = max(1, math.ceil(len(requests) / (CHUNKS_PER_THREAD * self.size)))
        chunks = [requests[start : start + size] for start in range(0, len(requests), size)]
        futures = self.client.map(_run, chunks, config=self.config, pure=False)
        if progress:
            from tqdm import tqdm

            sizes = {future.key: len(chunk) for future, chunk in zip(futures, chunks)}
            with tqdm(total=len(requests), desc="sandbox", unit="sample") as bar:
                for future in as_completed(futures, loop=self.client.loop):
                    bar.update(sizes[future.key])
        return [result for chunk in self.client.gather(futures) for result in chunk]

    def trace(self, program: str, call: str, max_vars: int, max_chars: int) -> TraceResult:
        return self.client.submit(_trace, self.config, program, call, max_vars, max_chars, pure=False).result()

    def close(self) -> None:
        self.client.close()


class _WorkerPools(WorkerPlugin):
    """A Dask worker's warm pools: one `LocalPools` per sandbox configuration it is sent, each in a slot
    (`LocalPools`' uid range) that no other Dask worker on the same machine holds; all closed with
    the worker."""

    name = PLUGIN_NAME
    idempotent = True  # a second Sandbox on the cluster keeps the pools the first one warmed

    def setup(self, worker) -> None:
        self.threads = worker.state.nthreads
        self.lock = threading.Lock()
        self.pools: dict[str, tuple[LocalPools, int]] = {}

    def get(self, config: SandboxConfig) -> LocalPools:
        key = config.model_dump_json()
        with self.lock:
            if key not in self.pools:
                slot, held = _claim_slot()
                self.pools[key] = LocalPools(config.model_copy(update={"workers": self.threads}), slot), held
            return self.pools[key][0]

    def teardown(self, worker) -> None:
        with self.lock:
            for pools, held in self.pools.values():
                pools.close()
                os.close(held)
            self.pools.clear()


def _claim_slot() -> tuple[int, int]:
    """The lowest slot whose lock file this process can lock, and the lock's descriptor: the lock
    lasts while the descriptor is open (or the process lives), so Dask workers on one machine never
    share a uid."""
    for slot in itertools.count():
        held = os.open(SLOT_LOCKS.format(slot), os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return slot, held
        except BlockingIOError:
            os.close(held)


def _pools(config: SandboxConfig) -> LocalPools:
    return get_worker().plugins[PLUGIN_NAME].get(config)


def _run(requests: list[ExecRequest], config: SandboxConfig) -> list[ExecResult]:
    return _pools(config).run(requests)


def _trace(config: SandboxConfig, program: str, call: str, max_vars: int, max_chars: int) -> TraceResult:
    return _pools(config).trace(program, call, max_vars, max_chars)


def _isolation(config: SandboxConfig, dask_worker) -> str:
    return dask_worker.plugins[PLUGIN_NAME].get(config).isolation
