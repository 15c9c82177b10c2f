"""Evidence for differential privacy: utility at epsilon in {1, 3, 8} per site
against non-private, and the cost of a DP-SGD step against a plain step.

    python -m fedlora.simulations.dp_benchmark --out runs/dp-benchmark

1. Step cost: one site's model (default: all-MiniLM-L6-v2 with LoRA), the same
   batch, timed steps interleaved round-robin (so load from other processes
   hits every variant alike); the median per variant and its ratio to the plain
   step. Plain = forward, mean loss, backward, AdamW; DP = per-sample clipping
   (Opacus hooks, or ghost clipping) + Gaussian noise + AdamW.
2. Utility: `fedlora simulate` on the default scenario (4 hospitals), once
   non-private and once per target epsilon (each site calibrates its sigma).

It prints a Markdown table for BENCHMARKS.md and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedlora import config as cfg
from fedlora.data.labels import infer_labels
from fedlora.data.sites import simulated_site_data
from fedlora.models import load_model
from fedlora.privacy.dpsgd import DPSGD, DPSettings
from fedlora.privacy.units import build_units
from fedlora.training import LocalTraining, trainable
from fedlora.simulations.launcher import simulate
from fedlora.tasks import build_task


# -- 1. step cost -------------------------------------------------------------------
def step_cost(config: cfg.RunConfig, batch_size: int, repeats: int) -> dict:
    """One step of the training loop on the same batch: plain, DP-SGD with hooks, DP-SGD with ghost
    clipping; steps interleaved round-robin, the median per variant."""
    task = build_task(config)
    loaded = load_model(config, task)
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    site = simulated_site_data(0, config.federation.num_sites, config, task)
    examples = task.encode(site.train, loaded.tokenizer, config.model.max_length)[:batch_size]
    batch = list(range(len(examples)))
    units = build_units(site.train[:len(examples)], "", 1)

    def loop(mode: str | None) -> LocalTraining:
        dp = None if mode is None else DPSGD(units, 1.0, 1.0, DPSettings(1.0, mode), torch.Generator().manual_seed(0))
        return LocalTraining(model, task, examples, pad_id, steps=1, seed=0, learning_rate=1e-4,
                             batch_size=len(examples), steps_method=dp)

    times: dict[str, list[float]] = {"plain": [], "dp-hooks": [], "dp-ghost": []}
    for _ in range(repeats + 1):  # the first pass warms up and is dropped
        for name, mode in (("plain", None), ("dp-hooks", "hooks"), ("dp-ghost", "ghost")):
            running = loop(mode).start()  # hooks attached outside the timed step
            start = time.perf_counter()
            running.step(batch)
            times[name].append(time.perf_counter() - start)
            running.finish(failed=True)  # one timed step: no did-it-train check
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    n_params = sum(p.numel() for p in trainable(model))
    return {"model": config.model.name, "batch": len(examples), "max_length": config.model.max_length,
            "trainable_parameters": n_params, "repeats": repeats,
            "seconds": median, "ratio": {k: v / median["plain"] for k, v in median.items()},
            "per_sample_grad_mib_hooks": len(examples) * n_params * 4 / 2 ** 20}


# -- 2. utility -----------------------------------------------------------------------
def utility(base: list[str], epsilons: list[float], out: Path) -> list[dict]:
    rows = []
    for eps in [None, *epsilons]:
        name = "non-private" if eps is None else f"eps-{eps:g}"
        extra = [] if eps is None else ["privacy.enabled=true", f"privacy.epsilon={eps:g}"]
        config = cfg.load_config(None, base + extra)
        rundir = out / name
        if not (rundir / "summary.json").exists():
            simulate(config, rundir)
        summary = json.loads((rundir / "summary.json").read_text())
        final, privacy = summary["final"], summary.get("privacy", {}).get("site_level", {})
        sites = privacy.get("sites", {}) if eps is not None else {}
        rows.append({"run": name, "target_epsilon": eps, "rounds": summary["rounds"],
                     "test_accuracy": final.get("test_accuracy"), "test_macro_f1": final.get("test_macro_f1"),
                     "eval_accuracy": final.get("eval_accuracy"), "epsilon": privacy.get("epsilon"),
                     "delta": privacy.get("delta"),
                     "sigma": sorted({round(s["noise_multiplier"], 3) for s in sites.values()}),
                     "seconds": summary["totals"]["seconds"]})
    return rows


def markdown(cost: dict | None, rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    if rows:
        lines += ["| run | epsilon per site (target / spent, delta) | sigma | test accuracy | test macro-F1 | "
                  "site eval accuracy | rounds | seconds |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            eps = "—" if r["target_epsilon"] is None else \
                f"{r['target_epsilon']:g} / {r['epsilon']:.2f}, {r['delta']:g}"
            sigma = ", ".join(f"{s:g}" for s in r["sigma"]) or "—"
            lines.append(f"| {r['run']} | {eps} | {sigma} | {r['test_accuracy']:.3f} | {r['test_macro_f1']:.3f} | "
                         f"{r['eval_accuracy']:.3f} | {r['rounds']} | {r['seconds']:.0f} |")
        lines.append("")
    if cost:
        lines += [f"Step cost, {cost['model']}, batch {cost['batch']}, max length {cost['max_length']}, "
                  f"{cost['trainable_parameters']} trainable parameters, median of {cost['repeats']} interleaved "
                  "steps:", "", "| step | seconds | × plain |", "|---|---|---|"]
        for k, v in cost["seconds"].items():
            lines.append(f"| {k} | {v:.3f} | {cost['ratio'][k]:.2f} |")
        lines.append(f"\nPer-sample gradients that hooks mode holds for this batch: "
                     f"{cost['per_sample_grad_mib_hooks']:.1f} MiB (ghost clipping keeps only their norms).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora.simulations.dp_benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/dp-benchmark", help="where runs and results.json go")
    parser.add_argument("--epsilons", default="1,3,8", help="target epsilons per site (comma-separated)")
    parser.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set model.name=tiny-bert")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the step-cost comparison")
    parser.add_argument("--skip-utility", action="store_true", help="only the step cost")
    parser.add_argument("--skip-step-cost", action="store_true", help="only the utility runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_config = infer_labels(cfg.load_config(None, args.set))
    cost = None if args.skip_step_cost else step_cost(base_config, args.batch_size, args.repeats)
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    rows = [] if args.skip_utility else utility(args.set, epsilons, out)
    (out / "results.json").write_text(json.dumps({"step_cost": cost, "utility": rows}, indent=2))
    command = "python -m fedlora.simulations.dp_benchmark " + " ".join(
        [f"--out {args.out}"] + [f"--set {s}" for s in args.set] +
        ([f"--epsilons {args.epsilons}"] if args.epsilons != "1,3,8" else []))
    print(markdown(cost, rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
