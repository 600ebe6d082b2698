"""The `cosmocore` command: resolve the configuration, execute samples in the sandbox, benchmarks."""

from __future__ import annotations

import argparse
import json
import runpy
import sys

from cosmocore.config import load_params, write_sections
from cosmocore.errors import CosmoCoreError
from cosmocore.logs import setup_logging

BENCHMARKS = ("learning", "sandbox", "rollout", "decode", "buffer", "agreement", "soak")


def _config(args) -> None:
    config = load_params(args.params)
    write_sections(config, args.out)
    print(f"profile {config.profile!r} resolved into {args.out}/")


def _exec(args) -> None:
    from cosmocore.sandbox.runner import run_jsonl

    counts = run_jsonl(args.samples, args.out, load_params(args.params).sandbox)
    print(json.dumps(counts, indent=2))


def _bench(args) -> None:
    sys.argv = [f"cosmocore.bench.{args.name}", *args.args]  # the bench parses its own arguments
    runpy.run_module(f"cosmocore.bench.{args.name}", run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cosmocore", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="validate params.yaml and write one resolved JSON file per section")
    config.add_argument("--out", default="data/config")
    config.set_defaults(run=_config)
    execute = commands.add_parser("exec", help="run samples (jsonl) against their tests in the sandbox")
    execute.add_argument("samples")
    execute.add_argument("--out", required=True)
    execute.set_defaults(run=_exec)
    bench = commands.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHMARKS))
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments (cosmocore bench NAME --help)")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    setup_logging("%(name)s %(levelname)s %(message)s")
    try:
        args.run(args)
    except CosmoCoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
