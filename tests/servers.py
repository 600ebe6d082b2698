"""Real servers for tests, started on a free loopback port and always stopped: an MLflow tracking server."""

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
from pathlib import Path

from flows.common import die_with_parent


def free_port() -> int:
    """A loopback port nothing listens on (the OS's pick; free until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, start_timeout: float = 180.0) -> Iterator[str]:
    """`mlflow server` with a sqlite store and an artifacts folder in `folder`, artifacts served over HTTP
    (`--artifacts-destination`), as a user would run it; yields its URI, `http://127.0.0.1:PORT`. The server
    runs in a process group of its own (uvicorn under the `mlflow` command), killed whole on exit, and dies
    with this process if that is killed first. Its log is `folder/server.log`."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")]
    # no server-side job runner (GenAI scorers, prompt optimisation): four processes fewer on a small machine
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start; its log:\n{(folder / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        with contextlib.suppress(ProcessLookupError):  # anything of the group still standing after its leader
            os.killpg(server.pid, signal.SIGKILL)
