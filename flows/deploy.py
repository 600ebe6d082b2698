"""Every CosmoCore deployment, declared here, deployed to a process work pool that runs them in this checkout:

    prefect server start                               # the API and the UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect work-pool create cosmocore --type process
    python -m flows.deploy                             # creates or updates the deployments below
    prefect worker start --pool cosmocore              # runs what the schedules, the UI and the CLI start

Declared in Python rather than in a `prefect.yaml`: each deployment names its flow object, so its run form
comes from the flow's signature and docstring; the defaults are validated against the typed config here,
before anything is deployed; and the command checks the API and the work pool first and stops in seconds
with the fix, where `prefect deploy` retries for seconds and ends in a traceback.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from cosmocore.config import load_params
from cosmocore.errors import CosmoCoreError
from cosmocore.variants import VARIANTS
from flows.common import run_main
from flows.pipeline import REPO, assignments

POOL = "cosmocore"
API_TIMEOUT_S = 3.0
# (entrypoint, deployment name, cron, parameters, description)
DEPLOYMENTS = (
    ("flows/pipeline.py:pipeline_flow", "nightly", "0 3 * * *", {"profile": "default"},
     "the pipeline on the default profile, every night; trigger it with any profile, variants, seeds and overrides"),
    ("flows/pipeline.py:pipeline_flow", "ablation", "0 3 * * 6",
     {"profile": "ablation", "variants": list(VARIANTS), "seeds": [0, 1, 2]},
     "the ablation study: every variant and three seeds on the ablation profile, every Saturday"),
    ("flows/bench.py:learning_bench_flow", "weekly", "0 3 * * 0", {"size": "cpu"},
     "the learning benchmark (cosmocore bench learning), every Sunday"),
)


def check_api(url: str | None) -> None:
    """Raise `CosmoCoreError` naming `prefect server start` unless a Prefect API answers at `url`."""
    start = "start one with `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
    if not url:
        raise CosmoCoreError(f"PREFECT_API_URL is not set, so there is no server to deploy to: {start}")
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=API_TIMEOUT_S).close()
    except (urllib.error.URLError, OSError) as error:
        raise CosmoCoreError(f"no Prefect server answers at PREFECT_API_URL={url} ({getattr(error, 'reason', error)}): "
                             f"{start}, or point PREFECT_API_URL at the one you run") from None


def check_defaults() -> None:
    """Every deployment's default parameters pass the typed config's validation."""
    for entrypoint, name, _, parameters, _ in DEPLOYMENTS:
        try:
            if "size" in parameters:
                load_params(REPO / "params.yaml", f"bench_{parameters['size']}")
            else:
                load_params(REPO / "params.yaml", parameters["profile"], assignments([], parameters.get("variants"), parameters.get("seeds")))
        except CosmoCoreError as error:
            raise CosmoCoreError(f"deployment {name} ({entrypoint}): {error}") from None


def deploy() -> None:
    """Create or update every deployment on the work pool (Prefect prints them)."""
    from prefect import deploy as prefect_deploy
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import Flow
    from prefect.settings import PREFECT_API_URL

    check_api(PREFECT_API_URL.value())
    check_defaults()
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(POOL)
        except ObjectNotFound:
            raise CosmoCoreError(f"no work pool {POOL!r}: create it with `prefect work-pool create {POOL} --type process`") from None
    if pool.type != "process":
        raise CosmoCoreError(f"work pool {POOL!r} is of type {pool.type}: these deployments run in this checkout and need a "
                             f"process pool (`prefect work-pool create {POOL} --type process`, under another name if you keep this one)")
    deployments = []
    for entrypoint, name, cron, parameters, description in DEPLOYMENTS:
        flow = Flow.from_source(REPO, entrypoint)
        deployments.append(flow.to_deployment(name, cron=cron, parameters=parameters, description=description))
    prefect_deploy(*deployments, work_pool_name=POOL, print_next_steps_message=False, ignore_warnings=True)
    print(f"Runs start once a worker serves the pool: prefect worker start --pool {POOL}")


def main() -> None:
    run_main(deploy)


if __name__ == "__main__":
    main()
