"""LoRA against full fine-tuning: the same model, the same data, the same optimizer steps.

Both variants train the classifier of the default scenario on the pooled training rows
of all its sites (the centralized baseline's data, fedlora/bench/baselines.py)
and are scored on the central test set. LoRA is what a fedlora site trains (the
configured LoRA factors plus the task head, through `fedlora.models.load_model`);
full fine-tuning trains every weight of the same base model. The framework has no
full fine-tuning path on purpose (only adapters ever leave a site), so this module
builds one from the framework's own loaders: `load_base_model` without the LoRA
wrapper, every parameter trainable (`full_model`).

Each variant runs in its own spawned process, so each one's peak memory is its own
(CPU RSS from `resource.getrusage`), and the two take turns: a chunk of steps of one,
then a chunk of the other, so load from other processes hits both alike. The step is
`fedlora.training.local_train`'s (same batches, AdamW, clipping), one step at a time
(`Trainer`).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora import config as cfg
from fedlora.arrays import to_record
from fedlora.bench.suite import BenchContext, SuiteResult, markdown_table, torch_threads
from fedlora.data.labels import infer_labels
from fedlora.data.sites import central_test_rows, simulated_site_data
from fedlora.models import (
    count_parameters,
    export_adapter,
    load_base_model,
    load_model,
    load_tokenizer,
    trainable_state,
)
from fedlora.tasks import build_task
from fedlora.training import LocalTraining, evaluate_counts, planned_steps

NAME = "lora-vs-full"
TITLE = "LoRA against full fine-tuning"

# Learning rates, each sensible for its kind of training (AdamW, batch 16):
LORA_LR = 3e-3   # fedlora's default train.learning-rate, the one the default scenario is measured with
FULL_LR = 5e-5   # the usual rate for fully fine-tuning a BERT-family encoder (Devlin et al.: 2e-5..5e-5)

# What the literature commonly claims for LoRA, compared in one sentence each.
CLAIMS = {"compute_saving": (0.70, 0.85), "trained_share": (0.0001, 0.01),
          "adapter_mb": (1.0, 10.0), "quality_ratio": (0.90, 0.95)}


@dataclass
class Plan:
    model: str
    steps: int | None           # optimizer steps of each variant; None: the federation's total (as baselines.py)
    chunk: int                  # steps one variant takes before the other takes its turn
    sets: list[str] = field(default_factory=list)  # config overrides beside model.name
    batch_size: int = 16
    seed: int = 0

    def overrides(self) -> list[str]:
        return [f"model.name={self.model}", f"train.batch-size={self.batch_size}", f"train.seed={self.seed}",
                *self.sets]


QUICK = Plan(model="minilm", steps=40, chunk=4)
FULL = Plan(model="minilm", steps=None, chunk=8)


# -- the pure parts ---------------------------------------------------------------------
def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None where either is missing or the denominator is 0."""
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def against(value: float, low: float, high: float) -> str:
    """Where a measured value lies beside a claimed range: 'below', 'within' or 'above'."""
    return "below" if value < low else "above" if value > high else "within"


def full_model(config, task):
    """(model, tokenizer) for full fine-tuning: the base model fedlora would wrap with LoRA,
    unwrapped, every parameter trainable."""

    m = config.model
    tokenizer = load_tokenizer(m.name, m.allow_download)
    model = load_base_model(m.name, task.peft_task_type, getattr(task, "num_labels", 0), tokenizer, m.seed,
                            m.allow_download)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tokenizer


def lora_model(config, task):
    """(model, tokenizer) for LoRA: exactly what a fedlora site trains."""

    loaded = load_model(config, task)
    return loaded.model, loaded.tokenizer


def update_state(model, full: bool) -> dict[str, np.ndarray]:
    """What one site would send per round: the trainable tensors (LoRA factors and head), or for
    full fine-tuning the whole state dict, float32."""

    if not full:
        return trainable_state(model)
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}


def update_bytes(state: dict[str, np.ndarray]) -> int:
    """Bytes of the update as a Flower ArrayRecord, the payload of a site's reply."""

    return to_record(state).count_bytes()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class Trainer:
    """The one training loop (fedlora.training.LocalTraining, as the sites run it: same seeding,
    batches, AdamW, clipping), one timed step at a time, so that two variants can take turns."""

    def __init__(self, model, task, examples, train_cfg, pad_id: int, seed: int, steps: int):
        self.loop = LocalTraining(model, task, examples, pad_id, steps=steps, seed=seed,
                                  learning_rate=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay,
                                  batch_size=train_cfg.batch_size, max_grad_norm=train_cfg.max_grad_norm).start()
        self.losses: list[float] = []

    def step(self) -> tuple[float, float]:
        """One optimizer step; returns its (wall, CPU) seconds (CPU: all of this process' threads)."""
        started, cpu = time.perf_counter(), time.process_time()
        loss = self.loop.step()
        seconds = time.perf_counter() - started, time.process_time() - cpu
        self.losses.append(loss)
        return seconds


def rss_bytes() -> int:
    """Resident set size of this process now (CPU memory), from /proc; the peak so far elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# -- one variant, in its own process ----------------------------------------------------
def run_config(plan: Plan, full: bool):
    """The run configuration a variant trains with: the plan's settings at the variant's learning rate."""

    lr = FULL_LR if full else LORA_LR
    return infer_labels(cfg.load_config(None, [*plan.overrides(), f"train.learning-rate={lr:g}"]))


def pooled_rows(config, task) -> list[dict]:
    """All simulated sites' training rows, pooled (the centralized baseline's data)."""

    n = config.federation.num_sites
    return [row for k in range(n) for row in simulated_site_data(k, n, config, task).train]


def federation_steps(config, task) -> int:
    """Optimizer steps of the whole federation (Σ sites and rounds), as the centralized baseline takes."""

    n, tc = config.federation.num_sites, config.train
    return config.federation.rounds * sum(
        planned_steps(len(simulated_site_data(k, n, config, task).train), tc.batch_size, tc.local_epochs,
                      tc.local_steps) for k in range(n))


def _serve(conn, plan_dict: dict, full: bool, steps: int, export_dir: str) -> None:
    """A variant's process: load, then answer ('train', n) and ('finish',) until ('stop',)."""
    try:
        torch.set_num_threads(torch_threads())

        plan = Plan(**plan_dict)
        config = run_config(plan, full)
        task = build_task(config)
        model, tok = (full_model if full else lora_model)(config, task)
        pad, max_len = tok.pad_token_id, config.model.max_length
        train = task.encode(pooled_rows(config, task), tok, max_len)
        test = task.encode(central_test_rows(config, task), tok, max_len)
        rss_after_load = rss_bytes()
        trainable, total = count_parameters(model)
        lora_factors = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        targets = ", ".join(sorted(model.peft_config["default"].target_modules)) if not full else ""
        trainer = Trainer(model, task, train, config.train, pad, plan.seed, steps)
        conn.send(("ready", {"trainable": trainable, "total": total, "lora_factors": lora_factors,
                             "target_modules": targets,
                             "train_rows": len(train), "test_rows": len(test)}))
        while True:
            request = conn.recv()
            if request[0] == "train":
                conn.send(("ok", [trainer.step() for _ in range(request[1])]))
            elif request[0] == "finish":
                model.eval()
                scores = task.metrics(evaluate_counts(model, task, test, pad))
                out = Path(export_dir)
                shutil.rmtree(out, ignore_errors=True)  # no file of an earlier run in the size
                if full:
                    model.save_pretrained(str(out))
                else:
                    export_adapter(model, out, config.model.name)
                conn.send(("ok", {
                    "test_accuracy": scores.get("eval_accuracy"), "test_macro_f1": scores.get("eval_macro_f1"),
                    "final_train_loss": statistics.fmean(trainer.losses[-8:]) if trainer.losses else None,
                    "update_bytes": update_bytes(update_state(model, full)),
                    "disk_bytes": folder_bytes(out),
                    "peak_rss_bytes": peak_rss_bytes(), "rss_after_load_bytes": rss_after_load}))
            else:
                return
    except BaseException:  # the parent re-raises it with the traceback
        conn.send(("error", traceback.format_exc()))


class Variant:
    """The parent's handle on a variant's process."""

    def __init__(self, mp, name: str, plan: Plan, full: bool, steps: int, export_dir: Path):
        self.name = name
        self.conn, child = mp.Pipe()
        self.process = mp.Process(target=_serve, args=(child, asdict(plan), full, steps, str(export_dir)),
                                  name=f"bench-{name}", daemon=True)
        self.process.start()
        child.close()
        self.info = self._answer()
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []

    def _answer(self) -> Any:
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"{self.name}: its process ended (exit code {self.process.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"{self.name} failed:\n{payload}")
        return payload

    def train(self, steps: int) -> None:
        self.conn.send(("train", steps))
        for wall, cpu in self._answer():
            self.step_seconds.append(wall)
            self.step_cpu_seconds.append(cpu)

    def finish(self) -> dict:
        self.conn.send(("finish",))
        return self._answer()

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


# -- the suite ------------------------------------------------------------------------
def measure(plan: Plan, workdir: Path, progress=lambda items, label: items) -> dict:
    base = run_config(plan, full=False)
    steps = plan.steps or federation_steps(base, build_task(base))
    mp = multiprocessing.get_context("spawn")
    variants: list[Variant] = []
    try:
        for name, full in (("lora", False), ("full", True)):
            variants.append(Variant(mp, name, plan, full, steps, workdir / f"{name}-export"))
        chunks = [min(plan.chunk, steps - i) for i in range(0, steps, plan.chunk)]
        for turn, chunk in enumerate(progress(chunks, "lora-vs-full steps")):
            for v in (variants if turn % 2 == 0 else variants[::-1]):  # alternate who goes first
                v.train(chunk)
        results = {v.name: {**v.info, **v.finish()} for v in variants}
        for v in variants:
            skip = 1 if len(v.step_seconds) > 1 else 0  # the first step pays one-off allocations
            results[v.name].update(median_step_seconds=statistics.median(v.step_seconds[skip:]),
                                   median_step_cpu_seconds=statistics.median(v.step_cpu_seconds[skip:]),
                                   train_seconds=sum(v.step_seconds), steps=len(v.step_seconds))
    finally:
        for v in variants:
            v.close()
    lora, full = results["lora"], results["full"]
    full.pop("target_modules")
    base_params = full["total"]
    for r in (lora, full):
        r["trainable_share"] = r["trainable"] / base_params
        r["memory_increase_bytes"] = r["peak_rss_bytes"] - r["rss_after_load_bytes"]
    return {
        "model": plan.model, "sites": base.federation.num_sites, "steps": steps, "batch_size": plan.batch_size,
        "max_length": base.model.max_length,
        "lora": {"rank": base.lora.rank, "alpha": base.lora.alpha, "target_modules": lora.pop("target_modules"),
                 "learning_rate": LORA_LR},
        "full_learning_rate": FULL_LR, "base_parameters": base_params, "variants": results,
        "ratios": {
            "step_time_full_over_lora": ratio(full["median_step_seconds"], lora["median_step_seconds"]),
            "step_cpu_full_over_lora": ratio(full["median_step_cpu_seconds"], lora["median_step_cpu_seconds"]),
            "compute_saving": 1 - ratio(lora["median_step_cpu_seconds"], full["median_step_cpu_seconds"]),
            "wall_saving": 1 - ratio(lora["median_step_seconds"], full["median_step_seconds"]),
            "peak_rss_full_over_lora": ratio(full["peak_rss_bytes"], lora["peak_rss_bytes"]),
            "memory_increase_full_over_lora": ratio(full["memory_increase_bytes"], lora["memory_increase_bytes"]),
            "update_bytes_full_over_lora": ratio(full["update_bytes"], lora["update_bytes"]),
            "accuracy_lora_over_full": ratio(lora["test_accuracy"], full["test_accuracy"]),
            "macro_f1_lora_over_full": ratio(lora["test_macro_f1"], full["test_macro_f1"]),
        },
    }


def claims(fig: dict, quick: bool = False) -> list[str]:
    """One sentence per commonly claimed figure, against what this run measured."""
    lora, full, r = fig["variants"]["lora"], fig["variants"]["full"], fig["ratios"]
    saving, wall, share = r["compute_saving"], r["wall_saving"], lora["trainable_share"]
    lora_share = lora["lora_factors"] / fig["base_parameters"]
    mb = lora["disk_bytes"] / 1e6
    quality = r["accuracy_lora_over_full"]
    lines = [
        f"- *70–85% less compute*: a LoRA step cost {saving:.0%} less CPU time than a full step here ({wall:.0%} "
        f"less wall time), {against(saving, *CLAIMS['compute_saving'])} the claim: the forward pass and the "
        "activation gradients through the frozen base are still paid in full; LoRA saves only the base "
        "weights' gradients and their AdamW update.",
        f"- *0.01–1% of parameters trained*: {share:.2%} here ({against(share, *CLAIMS['trained_share'])} the "
        f"claim), of which the LoRA factors are {lora_share:.2%} and the rest the new classification head.",
        f"- *adapters of a few MB*: {mb:.2f} MB on disk in PEFT format (the full model: "
        f"{full['disk_bytes'] / 1e6:.1f} MB), {against(mb, *CLAIMS['adapter_mb'])} 'a few MB' because this base "
        f"model is small ({fig['base_parameters'] / 1e6:.1f}M parameters); the figure is quoted for "
        "billion-parameter models (LLaMA-7B with r=8 on q and v: 4.2M parameters, 8.4 MB in fp16).",
    ]
    if quality is not None:
        measured = (f"LoRA reached {quality:.0%} of full fine-tuning's test accuracy "
                    f"({r['macro_f1_lora_over_full']:.0%} of its macro-F1) after the same {fig['steps']} steps")
        if quick:
            lines.append(f"- *90–95% of full fine-tuning quality*: {measured}, but {fig['steps']} steps is far from "
                         "convergence for either variant, so this quick-mode figure does not test the claim.")
        else:
            lines.append(f"- *90–95% of full fine-tuning quality*: {measured}, "
                         f"{against(quality, *CLAIMS['quality_ratio'])} the claimed range, each variant at its own "
                         "learning rate and neither tuned further.")
    return lines


def render(fig: dict, quick: bool) -> str:
    lora, full, r = fig["variants"]["lora"], fig["variants"]["full"], fig["ratios"]
    mib = 2 ** 20
    rows = [
        ["trainable parameters", f"{lora['trainable']:,}", f"{full['trainable']:,}",
         ratio(full["trainable"], lora["trainable"])],
        ["share of the model's parameters", f"{lora['trainable_share']:.3%}", f"{full['trainable_share']:.0%}", None],
        ["median step, wall s", lora["median_step_seconds"], full["median_step_seconds"],
         r["step_time_full_over_lora"]],
        ["median step, CPU s (all threads)", lora["median_step_cpu_seconds"], full["median_step_cpu_seconds"],
         r["step_cpu_full_over_lora"]],
        ["training wall time, s", lora["train_seconds"], full["train_seconds"],
         ratio(full["train_seconds"], lora["train_seconds"])],
        ["peak RSS (CPU), MiB", lora["peak_rss_bytes"] / mib, full["peak_rss_bytes"] / mib,
         r["peak_rss_full_over_lora"]],
        ["peak RSS over RSS after model load, MiB", lora["memory_increase_bytes"] / mib,
         full["memory_increase_bytes"] / mib, r["memory_increase_full_over_lora"]],
        ["update per site per round, bytes", f"{lora['update_bytes']:,}", f"{full['update_bytes']:,}",
         r["update_bytes_full_over_lora"]],
        ["saved on disk, MB", lora["disk_bytes"] / 1e6, full["disk_bytes"] / 1e6,
         ratio(full["disk_bytes"], lora["disk_bytes"])],
        ["test accuracy", lora["test_accuracy"], full["test_accuracy"], None],
        ["test macro-F1", lora["test_macro_f1"], full["test_macro_f1"], None],
    ]
    lines = [
        f"{fig['model']} on the default scenario's pooled synthetic training rows ({lora['train_rows']} notes of "
        f"{fig['sites']} sites), scored on the central test set ({lora['test_rows']} notes); {fig['steps']} AdamW "
        f"steps of batch {fig['batch_size']}, max length {fig['max_length']}, for each variant"
        + (" (quick mode: far fewer steps than the full suite, so the quality figures are early-training "
           "figures)." if quick else " (the federation's total, as the centralized baseline)."),
        f"LoRA: r={fig['lora']['rank']}, alpha={fig['lora']['alpha']:g} on {fig['lora']['target_modules']} plus "
        f"the classification head, lr {LORA_LR:g} (fedlora's default). Full fine-tuning: every weight, "
        f"lr {FULL_LR:g} (the usual BERT fine-tuning rate).",
        "",
        markdown_table(["", "LoRA", "full fine-tuning", "full / LoRA"], rows),
        "",
        f"Quality, LoRA / full: accuracy {r['accuracy_lora_over_full']:.3f}, "
        f"macro-F1 {r['macro_f1_lora_over_full']:.3f}.",
        "",
        "Each variant ran in its own spawned process; the two took turns in chunks of steps, so machine "
        "load hit both alike. Step time: the median step (the first dropped), as wall time and as CPU time "
        "of the variant's process (all its threads: the compute, less disturbed by other jobs than wall "
        "time). Memory is CPU resident set size (`getrusage` ru_maxrss); 'over RSS after model load' is the "
        "peak minus the RSS once the model "
        "and the tokenized data were in memory: weights' gradients, AdamW state and activations. Update "
        "bytes: the serialized Flower ArrayRecord a site would send (LoRA: adapter + head; full: the whole "
        "state dict). On disk: PEFT `save_pretrained` of the adapter vs the full model's `save_pretrained`.",
        "",
        "Against the commonly claimed figures:",
        "",
        *claims(fig, quick),
    ]
    return "\n".join(lines)


def run(ctx: BenchContext) -> SuiteResult:
    plan = QUICK if ctx.quick else FULL
    started = time.perf_counter()
    fig = measure(plan, ctx.folder(NAME), ctx.progress)
    fig["seconds"] = time.perf_counter() - started
    fig["quick"] = ctx.quick
    notes = ["lora-vs-full: memory figures are CPU RSS of each variant's own process, not GPU memory."]
    if ctx.quick:
        notes.append(f"lora-vs-full: quick mode trains {fig['steps']} steps only; quality figures are not final.")
    return SuiteResult(fig, render(fig, ctx.quick), notes)
