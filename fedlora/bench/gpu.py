"""GPU: tokens per second and peak memory of a site's local training, by precision and memory saver.

No weights can be downloaded, so the model is a causal LM built from a Llama configuration with
random weights (full: about 1.0 billion parameters; quick: a small one), saved once as a model
folder and loaded back through the product's own path (`model.name` = that folder, so a 4-bit base
is quantized as it loads, as at a site). Each variant then runs the one training loop on the same
random token sequences, with the settings a site would set:

- `fp32`: float32 throughout;
- `bf16`: forward passes under bf16 autocast (`train.precision = bf16`);
- `bf16 + checkpointing`: and `train.gradient-checkpointing = true`;
- `4-bit base, bf16`: `model.quantization = 4bit` (QLoRA: NF4 base, float32 adapters);
- `4-bit base, bf16 + checkpointing`;
- `DP-SGD, bf16`: the adapter under DP-SGD (Opacus hooks, per-sample clipping, noise; σ = 1).

Per variant: tokens per second over the timed steps (after one warm-up step; DP-SGD counts the
records its Poisson batches held), and the peak memory the device allocated from loading the model
to the last step (weights, activations, optimizer state). Without a CUDA GPU the full suite does not
run and says so; the quick suite runs its small model on the CPU, which exercises every code path
but measures nothing worth quoting.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora import config as cfg
from fedlora.bench.suite import BenchContext, SuiteResult, markdown_table
from fedlora.compute import peak_memory, reset_peak_memory, resolve_device, synchronize
from fedlora.models import count_parameters, load_model, load_tokenizer
from fedlora.privacy.dpsgd import DPSGD, DPSettings
from fedlora.privacy.units import build_units
from fedlora.tasks import build_task
from fedlora.training import LocalTraining

NAME = "gpu"
TITLE = "GPU: tokens per second and peak memory of local training"

@dataclass(frozen=True)
class Variant:
    name: str
    settings: tuple[str, ...]  # on top of the plan's
    dp_sgd: bool = False


VARIANTS = (
    Variant("fp32", ("train.precision=fp32",)),
    Variant("bf16", ("train.precision=bf16",)),
    Variant("bf16 + checkpointing", ("train.precision=bf16", "train.gradient-checkpointing=true")),
    Variant("4-bit base, bf16", ("train.precision=bf16", "model.quantization=4bit")),
    Variant("4-bit base, bf16 + checkpointing", ("train.precision=bf16", "model.quantization=4bit",
                                                 "train.gradient-checkpointing=true")),
    Variant("DP-SGD, bf16", ("train.precision=bf16",), dp_sgd=True),
)


@dataclass(frozen=True)
class Plan:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    batch: int          # sequences per step
    length: int         # tokens per sequence
    steps: int          # timed steps (one more warms up)
    device: str

    def llama(self, vocab_size: int, pad_id: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab_size, hidden_size=self.hidden, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           intermediate_size=self.intermediate, max_position_embeddings=max(2048, self.length),
                           pad_token_id=pad_id, tie_word_embeddings=True)


# About 1.0e9 parameters with the demo tokenizer's 30,522 words: 16 layers of 60.8 M plus 62.5 M of embeddings.
FULL = Plan(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, batch=8, length=512, steps=10,
            device="cuda")
QUICK = Plan(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, batch=4, length=64, steps=2,
             device="cpu")


def build_model_folder(plan: Plan, folder: Path) -> Path:
    """A causal LM with random weights from the plan's configuration, saved in float32 with the demo
    tokenizer: a model folder as a site would name it in model.name."""
    tokenizer = load_tokenizer("tiny-llama")  # the demo model's vocabulary, shipped with the package
    torch.manual_seed(0)
    model = LlamaForCausalLM(plan.llama(len(tokenizer), tokenizer.pad_token_id))
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def token_examples(plan: Plan, vocab_size: int, count: int) -> list[dict]:
    """Random token sequences, every token a target (what a long completion costs)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (count, plan.length), generator=generator).tolist()
    return [{"input_ids": seq, "labels": seq} for seq in ids]


def measure(plan: Plan, folder: Path, variant: Variant) -> dict:
    """One variant: load as a site would, one warm-up step, then `plan.steps` timed steps."""
    config = cfg.load_config(None, [f"model.name={folder}", "task.type=causal-lm",
                                    f"model.max-length={plan.length}", f"model.device={plan.device}",
                                    f"train.batch-size={plan.batch}", *variant.settings])
    device = resolve_device(plan.device)
    reset_peak_memory(device)
    task = build_task(config)
    loaded = load_model(config, task)
    examples = token_examples(plan, len(loaded.tokenizer), plan.batch * 4)
    dp = None
    if variant.dp_sgd:  # Poisson batches of the same expected size
        dp = DPSGD(build_units([{}] * len(examples), "", 1), plan.batch / len(examples), 1.0, DPSettings(1.0))
    trainable, total = count_parameters(loaded.model)
    loop = LocalTraining(loaded.model, task, examples, loaded.tokenizer.pad_token_id, steps=plan.steps + 1, seed=0,
                         learning_rate=1e-4, batch_size=plan.batch, steps_method=dp,
                         precision=config.train.precision).start()
    loss = loop.step()  # warm-up: kernels chosen, memory pools grown
    synchronize(device)
    records, start = loop.records, time.perf_counter()
    for _ in range(plan.steps):
        loss = loop.step()
    synchronize(device)
    seconds = time.perf_counter() - start
    loop.finish(failed=dp is not None)  # a few timed steps: no did-every-tensor-train check
    tokens = (loop.records - records) * plan.length
    row = {"variant": variant.name, "device": str(device), "tokens_per_second": tokens / seconds, "seconds": seconds,
           "steps": plan.steps, "tokens": tokens, "peak_memory_bytes": peak_memory(device),
           "trainable_parameters": trainable, "parameters": total,
           "last_loss": loss if loss is None or math.isfinite(loss) else None}
    del loop, loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(ctx: BenchContext) -> SuiteResult:
    plan = QUICK if ctx.quick else FULL
    if plan.device == "cuda" and not torch.cuda.is_available():
        return SuiteResult(figures={"ran": False, "reason": "no CUDA GPU on this machine"},
                           markdown="Not run: this machine has no CUDA GPU. The suite (`fedlora bench --only gpu`) "
                                    "is ready for one; `--quick` runs its small model on the CPU to check the code "
                                    "paths, with figures not worth quoting.",
                           notes=["gpu: not run (no CUDA GPU)"])
    folder = build_model_folder(plan, ctx.folder(NAME) / "model")
    rows = [measure(plan, folder, variant) for variant in ctx.progress(VARIANTS, "variants")]
    figures = {"ran": True, "plan": plan.__dict__, "gpu": torch.cuda.get_device_name() if plan.device == "cuda"
               else None, "rows": rows}
    return SuiteResult(figures=figures, markdown=markdown(figures))


def markdown(f: dict) -> str:
    plan, rows = f["plan"], f["rows"]
    base = rows[0]
    table = markdown_table(
        ["variant", "tokens / s", "× fp32", "peak memory (GiB)", "trainable parameters"],
        [[r["variant"], round(r["tokens_per_second"]), r["tokens_per_second"] / base["tokens_per_second"],
          None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2 ** 30, r["trainable_parameters"]]
         for r in rows])
    where = f["gpu"] or "the CPU (quick mode: code paths only)"
    return (f"A causal LM of {base['parameters'] - base['trainable_parameters']:,} base parameters (Llama "
            f"configuration, random weights: hidden {plan['hidden']}, {plan['layers']} layers), LoRA on q_proj and "
            f"v_proj, batches of {plan['batch']} × {plan['length']} tokens, {plan['steps']} timed steps after one "
            f"warm-up, on {where}.\n\n{table}\n")
