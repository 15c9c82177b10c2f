"""Communication: what a site uploads per round, LoRA against full-model FedAvg, and what
upload compression ([compression], fedlora/compression.py) saves and costs in quality.

(a) Bytes of one site's update per round: the LoRA adapter update (the trainable
tensors a fedlora site sends: LoRA factors and the task head) against a full-model
FedAvg update (every floating-point weight of the same base model, as float32).
Both are measured the same way: the tensors put in one Flower ArrayRecord
(`fedlora.arrays.to_record`) and weighed with `count_bytes`, as the round loop
weighs every message.

(b) For each compression method, one federated run of the classification scenario
(the real ServerApp and ClientApp over the in-process Grid, messages serialized;
fedlora/simulations/inprocess.py), all with the same seeds, so the runs differ only
in what the sites upload. Reported: the encoded update's bytes per site and round,
every upload per site and round as the run recorded it (metrics.jsonl `bytes_up`:
train replies with their metrics, and evaluate replies), each as a ratio to the
uncompressed run, and the final central test accuracy (the quality cost).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fedlora import config as cfg
from fedlora.arrays import to_record
from fedlora.bench.lora_vs_full import full_model, update_state
from fedlora.bench.suite import BenchContext, SuiteResult, markdown_table
from fedlora.compression import encode
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.inprocess import run_inprocess
from fedlora.tasks import build_task

NAME = "communication"
TITLE = "Communication: LoRA vs full-model updates, and upload compression"

# Quick: all-MiniLM-L6-v2 on few notes and steps (about half a minute of CPU per run on 2 cores);
# full: the default scenario's model, corpus and 4 sites at the quality suite's scale (3 rounds, 160 notes
# per site), so the two suites' accuracies compare.
QUICK_SETS = ("federation.rounds=2", "data.records-per-site=40", "train.local-steps=3", "model.max-length=32")
FULL_SETS = ("federation.rounds=3", "data.records-per-site=160")
# (method, error feedback): without feedback only in full mode, where runs are long enough to show it.
QUICK_VARIANTS = (("none", False), ("fp16", False), ("int8", True), ("topk", True))
FULL_VARIANTS = (("none", False), ("fp16", False), ("int8", True), ("int8", False), ("topk", True), ("topk", False))


def full_model_state(config) -> dict[str, np.ndarray]:
    """Every weight of the run's base model (with its task head), as float32: what full-model FedAvg sends."""

    model, _ = full_model(config, build_task(config))
    return update_state(model, full=True)


def label(method: str, feedback: bool) -> str:
    if method in ("int8", "topk"):
        return f"{method}{'' if feedback else ', no error feedback'}"
    return method


def one_run(folder: Path, sets: list[str], method: str, feedback: bool) -> dict:
    """A fresh federated run with this compression; its bytes and final test metrics."""
    shutil.rmtree(folder, ignore_errors=True)  # never report an earlier run's figures
    config = cfg.load_config(None, [*sets, f"compression.method={method}",
                                    f"compression.error-feedback={'true' if feedback else 'false'}"])
    out = run_inprocess(config, folder)
    rundir = RunDirectory(out)
    rows = rundir.read_metrics()
    summary = json.loads((out / "summary.json").read_text())
    state = rundir.load_checkpoint().global_state  # the adapter's tensors: what every site's update has
    update = to_record(encode(state, method, config.compression.topk_fraction)).count_bytes()
    final = summary["final"]
    return {"method": method, "error_feedback": feedback if method in ("int8", "topk") else None,
            "update_bytes_per_site_round": update,
            "upload_bytes_per_site_round": sum(r["bytes_up"] for r in rows) / sum(r["sites"] for r in rows),
            "test_accuracy": final.get("test_accuracy"), "test_macro_f1": final.get("test_macro_f1"),
            "final_train_loss": final.get("train_loss"), "rounds": len(rows),
            "parameters": summary["parameters"], "run_dir": str(out)}


def run(ctx: BenchContext) -> SuiteResult:
    sets = list(QUICK_SETS if ctx.quick else FULL_SETS)
    variants = QUICK_VARIANTS if ctx.quick else FULL_VARIANTS
    root = ctx.folder(NAME)
    runs = [one_run(root / label(m, fb).replace(", ", "-").replace(" ", "-"), sets, m, fb)
            for m, fb in ctx.progress(variants, "compression methods")]
    base = runs[0]
    for r in runs:
        r["update_ratio"] = r["update_bytes_per_site_round"] / base["update_bytes_per_site_round"]
        r["upload_ratio"] = r["upload_bytes_per_site_round"] / base["upload_bytes_per_site_round"]
        both = r["test_accuracy"] is not None and base["test_accuracy"] is not None
        r["accuracy_change"] = r["test_accuracy"] - base["test_accuracy"] if both else None

    config = cfg.load_config(Path(base["run_dir"]) / "config.toml")  # labels as the run resolved them
    full_state = full_model_state(config)
    full = to_record(full_state).count_bytes()
    adapter = base["update_bytes_per_site_round"]
    lora = {"model": config.model.name, "lora_rank": config.lora.rank,
            "parameters": base["parameters"],  # from the run's summary.json (PEFT model: adapter + base)
            "full_model_parameters": int(sum(v.size for v in full_state.values())),
            "adapter_bytes_per_site_round": adapter, "full_model_bytes_per_site_round": full,
            "full_to_adapter": full / adapter}
    figures = {"settings": {"mode": "quick" if ctx.quick else "full", "sets": sets,
                            "sites": config.federation.num_sites, "rounds": config.federation.rounds,
                            "topk_fraction": config.compression.topk_fraction, "strategy": config.strategy.name},
               "lora_vs_full": lora,
               "compression": [{k: v for k, v in r.items() if k not in ("run_dir", "parameters")} for r in runs]}
    notes = ["With error feedback a site sends what int8 or topk left out in later rounds; what is left "
             "after the last round never reaches the coordinator, which weighs most in short runs."]
    if ctx.quick:
        notes.append("Quick mode: one seed and 2 short rounds; test accuracies differing by a few points are noise.")
    return SuiteResult(figures=figures, markdown=render(figures), notes=notes)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def render(fig: dict) -> str:
    s, lora, runs = fig["settings"], fig["lora_vs_full"], fig["compression"]
    scenario = ", ".join(s["sets"]) or "the `fedlora simulate` defaults"
    parts = [f"One site's update per round ({lora['model']}, LoRA r={lora['lora_rank']}; serialized as one Flower "
             "ArrayRecord, float32):", "",
             markdown_table(["update", "parameters", "bytes per site per round", "vs LoRA"],
                            [["LoRA adapter (+ task head)", lora["parameters"]["adapter"],
                              _mb(lora["adapter_bytes_per_site_round"]), "1×"],
                             ["full model (FedAvg)", lora["full_model_parameters"],
                              _mb(lora["full_model_bytes_per_site_round"]), f"{lora['full_to_adapter']:.0f}×"]]),
             "", f"Upload compression ({s['sites']} sites, {s['rounds']} rounds, strategy {s['strategy']}, "
             f"{scenario}; topk-fraction {s['topk_fraction']:g}):", "",
             markdown_table(["method", "update per site-round", "vs none", "all uploads per site-round", "vs none",
                             "test accuracy", "change vs none"],
                            [[label(r["method"], bool(r["error_feedback"])), _mb(r["update_bytes_per_site_round"]),
                              f"{r['update_ratio']:.3f}", _mb(r["upload_bytes_per_site_round"]),
                              f"{r['upload_ratio']:.3f}", r["test_accuracy"],
                              None if r["accuracy_change"] is None else f"{r['accuracy_change']:+.3f}"]
                             for r in runs]),
             "", reading(fig)]
    return "\n".join(parts)


def reading(fig: dict) -> str:
    lora, runs = fig["lora_vs_full"], fig["compression"]
    by = {label(r["method"], bool(r["error_feedback"])): r for r in runs}
    smallest = min(runs, key=lambda r: r["update_ratio"])
    changes = ", ".join(f"{name} {r['accuracy_change']:+.3f}" for name, r in by.items()
                        if name != "none" and r["accuracy_change"] is not None)
    return (f"A LoRA update is {lora['full_to_adapter']:.0f}× smaller than a full-model FedAvg update "
            f"({_mb(lora['adapter_bytes_per_site_round'])} against {_mb(lora['full_model_bytes_per_site_round'])} "
            f"per site per round). Compression shrinks it further, down to {smallest['update_ratio']:.2f}× "
            f"({label(smallest['method'], bool(smallest['error_feedback']))}; fp16 "
            f"{by['fp16']['update_ratio']:.2f}×, int8 {by['int8']['update_ratio']:.2f}×, topk "
            f"{by['topk']['update_ratio']:.2f}×, per-tensor headers and names included), with final test "
            f"accuracy changes against no compression of {changes}.")
