"""Run one pipeline stage: `python -m flows <stage> [args]`, which is what `dvc.yaml` calls.

Every stage is a fresh process. Unless PREFECT_API_URL names a running server, Prefect starts a
temporary API server at the stage's first flow call, which takes 5-10 s on 2 cores, after the stage
has spent as long importing torch, transformers and MLflow. Here the same server (Prefect's own app,
started with the command and settings of `prefect.server.api.server.SubprocessASGIServer`) starts
first, in its own process, so it comes up while the stage imports; it is stopped when the stage ends.
`python -m flows.<stage>` works too, without the head start.
"""

from __future__ import annotations

import atexit
import importlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from flows.common import die_with_parent

STAGES = ("prepare", "model", "train", "evaluate", "report")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn_server(port: int) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)


def _wait_until_healthy(server: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with status {server.returncode} (see its output above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the temporary Prefect server did not answer at {url} within {timeout:.0f} s: "
                       "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a running server")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        sys.exit(f"usage: python -m flows {{{','.join(STAGES)}}} [stage arguments]")
    stage = sys.argv.pop(1)
    server = None
    # In a multi-process run (`accelerate launch` or torchrun) only the main process (rank 0) runs the
    # flow; the others never talk to Prefect, so they start no server.
    if not os.environ.get("PREFECT_API_URL") and os.environ.get("RANK", "0") == "0":
        port = _free_port()
        server = _spawn_server(port)
        # Registered before prefect is imported, so it runs after prefect's own exit handlers have
        # sent their last logs (exit handlers run last-registered first).
        atexit.register(_stop, server)
        os.environ["PREFECT_API_URL"] = url = f"http://127.0.0.1:{port}/api"  # read when prefect is imported
        os.environ["PREFECT_UI_URL"] = ""  # it serves no UI: no "View at" links that die with the stage
    module = importlib.import_module(f"flows.{stage}")  # meanwhile the server starts
    if server is not None:
        timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])  # set in flows/__init__
        _wait_until_healthy(server, url, timeout)
    sys.argv[0] = module.__file__
    module.main()


if __name__ == "__main__":
    main()
