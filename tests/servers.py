"""Real servers for tests, started on a free loopback port and always stopped, as `docs/operations.md` has a
user start them: an MLflow tracking server, a Prefect server (UI on) and a process worker serving a work pool."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.common import die_with_parent

STOP_SECONDS = 5


def free_port() -> int:
    """A loopback port nothing listens on (the OS's pick; free until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _process(command: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """`command` in a process group of its own, its output in `log_path`; the whole group is stopped on exit,
    and the process dies with this one if this one is killed first."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=die_with_parent)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:  # a few seconds: uvicorn's graceful stop waits for clients' keep-alive connections (30 s with MLflow's)
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # anything of the group still standing after its leader
            os.killpg(process.pid, signal.SIGKILL)


def _wait_until_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer; the server's log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)


@contextlib.contextmanager
def mlflow_server(folder: Path, start_timeout: float = 180.0) -> Iterator[str]:
    """`mlflow server` with a sqlite store and an artifacts folder in `folder`, artifacts served over HTTP
    (`--artifacts-destination`); yields its URI, `http://127.0.0.1:PORT`. Its log is `folder/server.log`."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")]
    # no server-side job runner (GenAI scorers, prompt optimisation): four processes fewer on a small machine
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with _process(command, env, folder / "server.log") as server:
        _wait_until_healthy(server, f"{uri}/health", folder / "server.log", start_timeout)
        yield uri


@dataclass(frozen=True)
class PrefectServer:
    api_url: str  # http://127.0.0.1:PORT/api
    ui_url: str  # http://127.0.0.1:PORT
    env: dict[str, str]  # the environment of a client of this server: PREFECT_HOME and PREFECT_API_URL set
    folder: Path  # PREFECT_HOME, and the logs: server.log, worker.log


@contextlib.contextmanager
def prefect_server(folder: Path, env: dict[str, str] | None = None, start_timeout: float = 180.0) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port with PREFECT_HOME=`folder` and the UI on, its log
    `folder/server.log`; yields once its API answers."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ui_url = f"http://127.0.0.1:{port}"
    env = {**(env or os.environ), "PREFECT_HOME": str(folder), "PREFECT_API_URL": f"{ui_url}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _process(command, env, folder / "server.log") as server:
        _wait_until_healthy(server, f"{ui_url}/api/health", folder / "server.log", start_timeout)
        yield PrefectServer(f"{ui_url}/api", ui_url, env, folder)


@contextlib.contextmanager
def prefect_worker(server: PrefectServer, pool: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A process work pool `pool` on `server` (created) and `prefect worker start --pool` serving it, polling
    every 2 s, in `env` over the server's client environment; its log `server.folder/worker.log`."""
    env = {**server.env, **(env or {}), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"], env=env,
                   check=True, capture_output=True, timeout=120)
    with _process([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool], env, server.folder / "worker.log") as worker:
        yield worker
