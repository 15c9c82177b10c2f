"""`fedlora models`: the coordinator's model registry (fedlora.server.model_registry).

    fedlora models list | show V | compare V W | register RUN | promote V (--evaluation RUN | --simulate)

Promotion is gated on an evaluation-only run (model.compare-with) in which every site scored the
candidate and the current version in the same round. A deployment makes that run with `fedlora run`;
a simulated federation can let `promote --simulate` make it from the candidate's own configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable

from fedlora import config as cfg
from fedlora.client.review import win_rate
from fedlora.server.model_registry import COMPARISON, ModelRegistry, RegistryError, lower_is_better, site_metric

DEFAULT_TOLERANCE = 0.02
# (configuration, run directory) -> the run directory: the evaluation-only run in a simulated federation
Simulate = Callable[[cfg.RunConfig, Path], Path]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _headline(metrics: dict) -> str:
    shown = [k for k in ("test_accuracy", "eval_accuracy", "eval_macro_f1", "test_perplexity", "eval_perplexity")
             if k in metrics]
    return ", ".join(f"{k} {_fmt(metrics[k])}" for k in shown) or "no figures"


def _list(registry: ModelRegistry, args) -> int:
    versions = registry.versions()
    if not versions:
        print(f"{registry.path}: no versions yet (fedlora models register RUN_DIR)")
        return 0
    current = registry.current()
    for version in versions:
        record = registry.read(version)
        worst = _weakest_site(record.get("sites_evaluation") or {})
        print(f"{'*' if version == current else ' '} {version:<5} {record['registered_at']}  "
              f"parent {record.get('parent') or '-':<5} {record.get('strategy')}, {record.get('rounds')} rounds  "
              f"{_headline(record.get('metrics', {}))}{f'; weakest site {worst}' if worst else ''}")
    print("* current" if current else "no version is current yet (fedlora models promote V)")
    return 0


def _weakest_site(sites: dict) -> str:
    metric = site_metric(*sites.values())
    scored = {site: f[metric] for site, f in sites.items() if f.get(metric) is not None}
    if not scored:
        return ""
    site = (max if lower_is_better(metric) else min)(scored, key=scored.get)
    return f"{site} {metric} {scored[site]:.4g}"


def _show(registry: ModelRegistry, args) -> int:
    record = registry.read(args.version)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    version = registry.resolve(args.version)
    print(f"{version}{' (current)' if version == registry.current() else ''}, registered {record['registered_at']}")
    print(f"  adapter      {registry.folder(version) / 'adapter'} (sha256 {record['adapter_sha256'][:16]})")
    print(f"  from run     {record['run']}")
    parent = record.get("parent") or (f"an unregistered adapter (sha256 {record['parent_adapter_sha256'][:16]})"
                                       if record.get("parent_adapter_sha256") else "none: trained from scratch")
    print(f"  parent       {parent}")
    print(f"  training     {record.get('strategy')}, {record.get('rounds')} rounds")
    print(f"  figures      {_headline(record.get('metrics', {}))}")
    for site, figures in sorted((record.get("sites_evaluation") or {}).items()):
        print(f"    {site:<24} {', '.join(f'{k} {_fmt(v)}' for k, v in figures.items() if not isinstance(v, (dict, list)))}")
    site_level = (record.get("privacy") or {}).get("site_level") or {}
    for site, spent in sorted((site_level.get("sites") or {}).items()):
        print(f"  privacy      {site}: epsilon {_fmt(spent.get('epsilon'))}")
    for site, digest in sorted((record.get("data_snapshots") or {}).items()):
        print(f"  data         {site}: snapshot {digest[:16]}")
    for gate in record.get("gates", []):
        print(f"  gate         {gate['decided_at']} against {gate['current'] or '-'}: "
              f"{'passed' if gate['passed'] else 'refused'}: {gate['reason']}"
              + (f" (without {', '.join(gate['excused'])}, which had left)" if gate.get("excused") else ""))
        for site, counts in sorted((gate.get("review") or {}).items()):
            rate = win_rate(counts)
            print(f"    {site:<24} expert review win rate {'-' if rate is None else f'{rate:.2f}'} "
                  f"({counts.get('wins', 0)}/{counts.get('ties', 0)}/{counts.get('losses', 0)} wins/ties/losses)")
    return 0


def _compare(registry: ModelRegistry, args) -> int:
    a, b = registry.resolve(args.version), registry.resolve(args.other)
    ra, rb = registry.read(a), registry.read(b)
    print(f"{'':<26}{a:>12}{b:>12}")
    keys = sorted(set(ra.get("metrics", {})) | set(rb.get("metrics", {})))
    for key in keys:
        print(f"{key:<26}{_fmt(ra['metrics'].get(key)):>12}{_fmt(rb['metrics'].get(key)):>12}")
    sa, sb = ra.get("sites_evaluation") or {}, rb.get("sites_evaluation") or {}
    metric = site_metric(*sa.values(), *sb.values())
    for site in sorted(set(sa) | set(sb)):
        print(f"{site + ' ' + metric:<26}{_fmt(sa.get(site, {}).get(metric)):>12}"
              f"{_fmt(sb.get(site, {}).get(metric)):>12}")
    print("Each column is its own run's last round (the data of that time); only a promotion gate scores both "
          "on the same rows.")
    return 0


def _register(registry: ModelRegistry, args) -> int:
    version = registry.register(args.run)
    print(f"registered {args.run} as {version} in {registry.path}")
    return 0


def _read_comparison(run: Path) -> dict:
    path = Path(run).expanduser() / COMPARISON
    if not path.is_file():
        raise RegistryError(f"{run}: no {COMPARISON}; make one with an evaluation-only run "
                            "(--set model.warm-start=CANDIDATE --set model.compare-with=CURRENT)")
    return json.loads(path.read_text())


def _simulated_evaluation(registry: ModelRegistry, candidate: str, simulate: Simulate) -> Path:
    """The evaluation-only run in a simulated federation made from the candidate's own configuration."""
    current = registry.resolve("current")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(registry.read(candidate)["config"])
    folders = {name: json.dumps(str(registry.folder(v))) for name, v in (("candidate", candidate), ("current", current))}
    try:
        config = cfg.load_config(f.name, [
            f"model.warm-start={folders['candidate']}", f"model.compare-with={folders['current']}",  # quoted for TOML
            # evaluation only: no update is sent, so nothing that protects or attacks one applies
            'output.registry=""', "secagg.enabled=false", "secagg.dp-noise-multiplier=0", "privacy.client-dp=false",
            "simulation.secagg-dropouts=[]", 'simulation.attack="none"', "federation.drift-check=false",
            "output.resume=false", 'output.dir=""'])
    finally:
        os.unlink(f.name)
    out = registry.path / "evaluations" / f"{candidate}-vs-{current}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    print(f"evaluating {candidate} and {current} at every simulated site (run directory {out})", flush=True)
    return simulate(config, out)


def _promote(registry: ModelRegistry, args, simulate: Simulate | None) -> int:
    candidate = registry.resolve(args.version)
    evaluation = None
    if registry.current() is not None:
        if args.evaluation:
            evaluation = Path(args.evaluation)
        elif args.simulate and simulate is not None:
            evaluation = _simulated_evaluation(registry, candidate, simulate)
        else:
            raise RegistryError(f"promoting {candidate} over {registry.current()} needs the gate's evidence: "
                                "--evaluation RUN_DIR (an evaluation-only run) or --simulate")
    comparison = _read_comparison(evaluation) if evaluation else None
    metric = args.metric or _default_metric(comparison)
    result = registry.gate(candidate, comparison, metric, args.tolerance, str(evaluation or ""), args.without_site)
    registry.record_gate(result)
    for site, row in result.sites.items():
        print(f"  {site:<24} candidate {_fmt(row['candidate'])}  current {_fmt(row['current'])}  "
              f"change {_fmt(row['change'])}{'  WORSE' if site in result.worse_at else ''}")
    for site, counts in sorted(result.review.items()):
        rate = win_rate(counts)
        print(f"  {site:<24} expert review: {counts.get('wins', 0)} wins, {counts.get('ties', 0)} ties, "
              f"{counts.get('losses', 0)} losses for {candidate}"
              + (f" (win rate {rate:.2f})" if rate is not None else "") + f", {counts.get('unrated', 0)} not rated")
    if result.passed:
        print(f"promoted {candidate}: {result.reason}")
        return 0
    print(f"refused {candidate}: {result.reason}; {result.current} stays current", file=sys.stderr)
    return 1


def _default_metric(comparison: dict | None) -> str:
    return site_metric(((comparison or {}).get("models", {}).get("candidate", {}) or {}).get("pooled", {}))


def add_commands(sub: argparse._SubParsersAction, simulate: Simulate | None = None) -> None:
    """Register `fedlora models ...`; `simulate` runs an evaluation-only run for `promote --simulate`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=os.environ.get("FEDLORA_REGISTRY", "models"),
                        help="the registry folder (default: $FEDLORA_REGISTRY, else ./models)")
    models = sub.add_parser("models", help="the model registry: versions, lineage, gated promotion",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = models.add_subparsers(dest="models_command", required=True)
    p = msub.add_parser("list", parents=[common], help="every version, its parent and figures (* current)")
    p.set_defaults(action=_list)
    p = msub.add_parser("show", parents=[common], help="one version's lineage, per-site figures and gates")
    p.add_argument("version", help="vN, current or latest")
    p.add_argument("--json", action="store_true", help="the whole version record")
    p.set_defaults(action=_show)
    p = msub.add_parser("compare", parents=[common], help="two versions' figures side by side")
    p.add_argument("version")
    p.add_argument("other")
    p.set_defaults(action=_compare)
    p = msub.add_parser("register", parents=[common], help="add a finished run's adapter as the next version")
    p.add_argument("run", help="the run directory")
    p.set_defaults(action=_register)
    p = msub.add_parser("promote", parents=[common],
                        help="make a version current if, at every site, it is not worse than the current one")
    p.add_argument("version")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--evaluation", metavar="RUN_DIR",
                     help="an evaluation-only run (model.warm-start = the candidate, model.compare-with = the current "
                          "version) made by `fedlora run` or `fedlora simulate`")
    how.add_argument("--simulate", action="store_true",
                     help="make that run now in a simulated federation, from the candidate's configuration")
    p.add_argument("--metric", help="per-site figure to compare (default: eval_accuracy, or eval_perplexity for a "
                                    "language model; for a loss or perplexity, higher is worse)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="how much worse at any one site still passes, in the metric's units (default: %(default)s)")
    p.add_argument("--without-site", action="append", default=[], metavar="NAME",
                   help="a site that has left the consortium: it scored the current version but is not required to "
                        "score both now (repeatable; recorded in the decision)")
    p.set_defaults(action=lambda registry, args: _promote(registry, args, simulate))
    models.set_defaults(func=_run)


def _run(args) -> int:
    try:
        return args.action(ModelRegistry(args.registry), args)
    except (RegistryError, OSError) as err:
        print(f"fedlora models: {err}", file=sys.stderr)
        return 2
