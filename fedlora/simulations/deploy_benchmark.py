"""Model loading against local training at deployed sites, per round (BENCHMARKS.md, issue 6).

Runs a real loopback deployment (coordinator + N sites as separate processes,
TLS, site keys) twice with the same run:
  cold    a fresh ClientApp process imports torch/transformers and loads the base
          model for every message (Flower's behaviour; `worker = false` in site.toml)
  worker  the site worker keeps the model loaded; the ClientApp process only relays
and reads what each site measured (`<state-dir>/timings.jsonl`, never sent) and
the run's metrics.jsonl.

    python -m fedlora.simulations.deploy_benchmark --out runs/deploy-benchmark
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fedlora.simulations.loopback import LABELS, LoopbackFederation, metrics

MODES = ("cold", "worker")


def _site_rounds(timings: list[dict]) -> dict[int, dict[str, float]]:
    """Per round: seconds before the site's code could work (process start, imports, model and data
    load; train and evaluate messages together), and seconds of local training."""
    rounds: dict[int, dict[str, float]] = {}
    for t in timings:
        row = rounds.setdefault(t["round"], {"overhead": 0.0, "train": 0.0, "evaluate": 0.0})
        row["overhead"] += t["process_seconds"] + t.get("import_seconds", 0.0) + t["load_seconds"]
        if t["type"].startswith("train"):
            row["train"] += t.get("train_seconds", 0.0)
        else:
            row["evaluate"] += t["handler_seconds"]
    return rounds


def run_mode(mode: str, root: Path, sites: int, rounds: int, model: str, records: int) -> dict:
    fed = LoopbackFederation(root / mode, num_sites=sites, records=records, worker=mode == "worker")
    try:
        fed.start_coordinator()
        for name in fed.sites:
            fed.start_site(name, wait=False)
        for name in fed.sites:
            fed.wait_site(name)
        out = root / mode / "run"
        command = fed.run_command(out, f'model.name="{model}"', f'task.labels="{LABELS}"',
                                  f"federation.rounds={rounds}", f"federation.min-sites={sites}")
        done = subprocess.run(command, env=fed.env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"{mode}: fedlora run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    finally:
        fed.close()
    per_site = {name: _site_rounds([json.loads(x) for x in (fed.site_dir(name) / "state" / "timings.jsonl")
                                    .read_text().splitlines()]) for name in fed.sites}
    return {"mode": mode, "rounds": metrics(out), "sites": per_site}


def summarize(result: dict) -> dict[str, float]:
    rows = [r for site in result["sites"].values() for r in site.values()]
    first = [site[1] for site in result["sites"].values() if 1 in site]
    later = [r for site in result["sites"].values() for k, r in site.items() if k > 1]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else float("nan")

    return {
        "overhead_round1": mean([r["overhead"] for r in first]),
        "overhead_later": mean([r["overhead"] for r in later]),
        "train": mean([r["train"] for r in rows]),
        "evaluate": mean([r["evaluate"] for r in rows]),
        "round_seconds": mean([r["round_seconds"] for r in result["rounds"]]),
        "round_seconds_later": mean([r["round_seconds"] for r in result["rounds"][1:]]),
    }


def table(summaries: dict[str, dict[str, float]]) -> str:
    lines = ["| sites' ClientApp | load overhead per site, round 1 (s) | load overhead per site, later rounds (s) "
             "| local training per site and round (s) | round wall time, later rounds (s) |",
             "| --- | --- | --- | --- | --- |"]
    for mode, s in summaries.items():
        lines.append(f"| {mode} | {s['overhead_round1']:.1f} | {s['overhead_later']:.1f} | {s['train']:.1f} | "
                     f"{s['round_seconds_later']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora.simulations.deploy_benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the deployments and benchmark.json (default: a temp folder)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="minilm", help="base model (default: %(default)s, the demo model)")
    parser.add_argument("--records", type=int, default=320, help="rows per site (default: %(default)s)")
    args = parser.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="fedlora-deploy-bench-")).resolve()
    results = {mode: run_mode(mode, root, args.sites, args.rounds, args.model, args.records) for mode in MODES}
    summaries = {mode: summarize(result) for mode, result in results.items()}
    (root / "benchmark.json").write_text(json.dumps({"args": vars(args), "summaries": summaries,
                                                     "results": results}, indent=2))
    print(table(summaries))
    print(f"details: {root / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
