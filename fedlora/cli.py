"""The `fedlora` command."""

from __future__ import annotations

import argparse
import sys
import traceback
from datetime import datetime, timezone

from fedlora import __version__
from fedlora import config as cfg
from fedlora.bench.runner import add_parser as add_bench_parser
from fedlora.data.readers import DataError
from fedlora.deploy.cli import add_commands as add_deploy_commands
from fedlora.deploy.models_command import add_commands as add_models_commands
from fedlora.deploy.site_home import privacy_state
from fedlora.model_sources import ModelLoadError
from fedlora.privacy.plan import add_parsers as add_privacy_parsers
from fedlora.server.model_registry import RegistryError
from fedlora.simulations.launcher import SimulationFailed, simulate


def _simulate(args: argparse.Namespace) -> int:
    """`fedlora simulate`; a user's mistake (configuration, data, model) is one clear line, not a traceback."""
    overrides = list(args.set or [])
    if args.resume and not args.out:
        print("fedlora simulate: --resume needs --out, the run directory to continue", file=sys.stderr)
        return 2
    if args.resume:
        overrides.append("output.resume=true")
    config = cfg.load_config(args.config, overrides)
    out = args.out or f"runs/{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    try:
        simulate(config, out, verbose=args.verbose)
    except (DataError, ModelLoadError) as err:
        if args.verbose:
            traceback.print_exc()
        print(f"fedlora simulate: {err}", file=sys.stderr)
        return 2
    except SimulationFailed as err:
        print(f"fedlora simulate: {err}", file=sys.stderr)
        return 1
    return 0


def _gate_simulation(config: cfg.RunConfig, out) -> object:
    """`fedlora models promote --simulate`: the evaluation-only run in a simulated federation; what goes
    wrong there is the promotion's error, in one line."""
    try:
        return simulate(config, out)
    except (DataError, ModelLoadError, SimulationFailed) as err:
        raise RegistryError(f"the evaluation-only simulation failed: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning across institutions.")
    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate", help="simulate a whole federation on this machine (Flower Simulation Engine)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Simulate a federation of sites on this machine with Flower's Simulation Engine, "
                    "running the same ServerApp and ClientApp as a deployment.\n\n"
                    "With no arguments: 4 hospitals, each with its own non-IID share of a synthetic "
                    "clinical-notes triage corpus, fine-tune LoRA on all-MiniLM-L6-v2 for 5 rounds.\n\n"
                    "Configuration keys (TOML tables in --config, or --set section.key=value):\n\n"
                    + cfg.describe_options())
    sim.add_argument("--config", "-c", help="TOML file with [model], [lora], [task], [data], ... tables")
    sim.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                     help="override one key, e.g. --set federation.rounds=3 (repeatable)")
    sim.add_argument("--out", "-o", help="run directory to write (default: runs/<UTC timestamp>)")
    sim.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    sim.add_argument("--verbose", "-v", action="store_true",
                     help="print Flower's full log at the end, and the traceback of an error")
    sim.set_defaults(func=_simulate)

    add_privacy_parsers(sub, privacy_state)  # `fedlora privacy plan [--site DIR]`, `fedlora privacy plan-clients`
    add_deploy_commands(sub)  # `fedlora coordinator ...`, `fedlora site ...`, `fedlora run`
    add_models_commands(sub, _gate_simulation)  # `fedlora models ...`: the registry; promote --simulate runs a simulation
    add_bench_parser(sub)  # `fedlora bench`
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except cfg.ConfigError as err:
        print(f"fedlora: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
