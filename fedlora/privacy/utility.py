"""Will DP-SGD learn at a site's size? The per-step noise-to-signal ratio of a plan, a verdict
calibrated on two measured runs, and what would change it.

Per DP-SGD step a site adds N(0, (σ·C)²) to each of the d noised (trainable) coordinates of the
sum of its clipped per-record gradients and divides by the expected batch B. The noise on the
averaged gradient therefore has norm σ·C·√d / B, while the clipped signal (a mean of vectors of
norm ≤ C) has norm at most C:

    NSR = σ·√d / B        (C cancels; σ from the accountant for q = B / N, the steps and ε)

The verdict's thresholds come from two runs of one scenario (BENCHMARKS.md, "Differential
privacy": all-MiniLM-L6-v2, LoRA r = 8 on query/value + a classification head, d = 75,653,
4 sites, 5 rounds, ε = 8, δ = 1e-5, PRV). They are calibrated on that model and task only: a
guide, not a guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from fedlora.data.labels import infer_labels
from fedlora.model_sources import DEMO_MODEL, TINY_MODELS, ModelLoadError, demo_model_dir, not_found
from fedlora.models import _tiny_config, load_tokenizer, wrap_with_lora
from fedlora.privacy.accounting import epsilon_by_round
from fedlora.strategies import STRATEGIES
from fedlora.strategies.factors import factor_of, is_lora
from fedlora.tasks import build_task

D_REFERENCE = 75_653  # trainable parameters of the benchmark's adapter and head


def noise_to_signal(noise_multiplier: float, parameters: int, batch_size: float) -> float:
    """σ·√d / B: the norm of the noise on one step's averaged gradient over the most the clipped
    signal can be (C cancels)."""
    if parameters < 1 or batch_size <= 0:
        raise ValueError("parameters and batch size must be positive")
    return noise_multiplier * math.sqrt(parameters) / batch_size


@dataclass(frozen=True)
class Measured:
    """A benchmark run: its plan and what it reached."""
    caption: str
    units: int              # training records per site
    batch_size: int         # expected batch
    steps: int              # steps in all (5 rounds)
    noise_multiplier: float
    test_accuracy: float
    non_private_accuracy: float
    parameters: int = D_REFERENCE

    @property
    def nsr(self) -> float:
        return noise_to_signal(self.noise_multiplier, self.parameters, self.batch_size)


# The default scenario: 320 records per site (256 train), batch 64, 8 steps a round: chance, one class.
LEARNS_NOTHING = Measured("320 records per site (256 train), batch 64", 256, 64, 40, 1.24, 0.200, 0.848)
# 2,000 records per site (1,600 train), batch 256, 13 steps a round: it learns, partly.
LEARNS_PARTLY = Measured("2,000 records per site (1,600 train), batch 256", 1600, 256, 65, 1.09, 0.636, 0.978)
# A third point: sigma fixed at 0.3 on the default scenario for 2 rounds (16 steps) also stayed at chance.
FEW_STEPS = Measured("sigma 0.3 for 2 rounds at 256 train records, batch 64", 256, 64, 16, 0.3, 0.200, 0.848)
# The private recipe (the head alone, privacy.trainable, its features without dropout) on the default
# scenario: it learns, but little (BENCHMARKS.md, "Differential privacy": epsilon 8, 5 rounds, the mean of
# train.seed 0, 1, 2; non-private: the default recipe, 2 local epochs, "Curves").
HEAD_ALONE = Measured("the head alone at 320 records per site, batch 64", 256, 64, 40, 1.24, 0.482, 0.940,
                      parameters=1925)
# What server momentum added to HEAD_ALONE, the same three seeds (docs/privacy.md, "Which recipe under DP?").
SERVER_MOMENTUM = "strategy.name = fedavgm with strategy.fedavgm.momentum = 0.5"
MOMENTUM_ACCURACY = 0.581
# The same at 2,000 records per site, batch 256 (BENCHMARKS.md, "Differential privacy"); its non-private
# figure is the adapter run's (1 local epoch), not remeasured.
HEAD_ALONE_LARGE = Measured("the head alone at 2,000 records per site, batch 256", 1600, 256, 65, 1.09, 0.674,
                            LEARNS_PARTLY.non_private_accuracy, parameters=1925)

# At or above this, the verdict is that DP-SGD will not learn. The measured failure was 5.33; the
# line is drawn at 5 ("about 5") so that a recalibration moving sigma by a few percent does not flip
# the default scenario's verdict. Nothing between 1.17 and 5.33 was measured.
WILL_NOT_LEARN = 5.0
# At or below this (the 2,000-record run's 1.17), it learned, partly.
LEARNS = LEARNS_PARTLY.nsr

NOT_LEARN, DOUBTFUL, PARTLY = "will not learn", "doubtful", "learns, partly"

CAVEAT = ("calibrated on one model and task only (all-MiniLM-L6-v2, LoRA r=8 on query/value and a "
          "5-class head, 75,653 noised parameters, or the head alone, 1,925; the synthetic triage notes, 5 rounds "
          "at epsilon 8): a guide, not a guarantee")


def verdict(nsr: float) -> str:
    if nsr >= WILL_NOT_LEARN:
        return NOT_LEARN
    return PARTLY if nsr <= LEARNS else DOUBTFUL


def sentence(nsr: float, steps: int, head_only: bool = False) -> str:
    """The verdict in one plain sentence, with the measured point it rests on. The head alone is judged
    by its own measurement: an NSR does not compare across models that learn differently."""
    v = verdict(nsr)
    if head_only and v != NOT_LEARN:
        return (f"DP-SGD trains the head alone here (privacy.trainable): the noise on each step is {nsr:.2f}x "
                f"the clipped signal, and it learns, a little: {HEAD_ALONE.caption} (noise "
                f"{HEAD_ALONE.nsr:.2f}x, {HEAD_ALONE.steps} steps) reached {HEAD_ALONE.test_accuracy:.3f} against "
                f"{HEAD_ALONE.non_private_accuracy:.3f} without DP. A linear head on frozen features limits it "
                f"as much as the noise does: {HEAD_ALONE_LARGE.caption} reached {HEAD_ALONE_LARGE.test_accuracy:.3f}, "
                f"the adapter {LEARNS_PARTLY.test_accuracy:.3f}, against {LEARNS_PARTLY.non_private_accuracy:.3f} "
                f"without DP. Server momentum averages the noise across rounds at no epsilon: {SERVER_MOMENTUM} "
                f"raised the {HEAD_ALONE.test_accuracy:.3f} to {MOMENTUM_ACCURACY:.3f} (docs/privacy.md).")
    if v == NOT_LEARN:
        return (f"DP-SGD will not learn at this size: the noise on each step is {nsr:.2f}x the largest the "
                f"clipped signal can be (the measured run at {LEARNS_NOTHING.nsr:.2f} learned nothing: "
                f"accuracy {LEARNS_NOTHING.test_accuracy:.3f}, chance, one class predicted).")
    if v == DOUBTFUL:
        return (f"DP-SGD may learn little or nothing at this size: the noise on each step is {nsr:.2f}x the "
                f"clipped signal, between the measured run that learned nothing ({LEARNS_NOTHING.nsr:.2f}) "
                f"and the one that learned, partly ({LEARNS_PARTLY.nsr:.2f}).")
    text = (f"DP-SGD can learn at this size, partly: the noise on each step is {nsr:.2f}x the clipped signal, "
            f"at or below the measured run at {LEARNS_PARTLY.nsr:.2f} (test accuracy "
            f"{LEARNS_PARTLY.test_accuracy:.3f} against {LEARNS_PARTLY.non_private_accuracy:.3f} without DP).")
    if steps < LEARNS_PARTLY.steps:
        text += (f" It takes {steps} steps in all, fewer than that run's {LEARNS_PARTLY.steps}: a run at "
                 f"{FEW_STEPS.nsr:.2f} over {FEW_STEPS.steps} steps learned nothing.")
    return text


# -- the noised parameters -----------------------------------------------------------

@dataclass(frozen=True)
class NoisedParameters:
    """The trainable (noised) parameters of a run: LoRA factors by target module, and the rest (a head)."""
    total: int
    lora_a: int = 0
    lora_b: int = 0
    rank: int = 0
    by_module: tuple[tuple[str, int, int], ...] = ()   # (target module name, its A, its B parameters)
    frozen_a: bool = False                         # FFA: A not trained, not counted
    source: str = "--trainable-parameters"
    head_only: bool = False                        # privacy.trainable: the LoRA factors do not train

    @property
    def other(self) -> int:
        return self.total - self.lora_a - self.lora_b

    def fewer(self) -> list[tuple[str, int]]:
        """Settings with fewer noised parameters, and their count (computed, not estimated: LoRA
        factors grow linearly with the rank)."""
        if not (self.lora_a or self.lora_b):
            return []
        out = [("the head alone, the LoRA factors not trained (privacy.trainable = head)", self.other)] \
            if self.other else []
        lora = self.lora_a + self.lora_b
        if not self.frozen_a and self.lora_a:
            out.append(("A frozen, as FFA-LoRA does (strategy.name = ffa)", self.total - self.lora_a))
        for r in sorted({self.rank // 2, 1} - {0, self.rank}, reverse=True):
            out.append((f"rank {r} (lora.rank = {r})", self.other + lora * r // self.rank))
        if len(self.by_module) > 1:
            for name, a, b in self.by_module:
                out.append((f"LoRA on {name} only (lora.target-modules = [\"{name}\"])", self.other + a + b))
        if not self.frozen_a and self.lora_a and self.by_module:
            name, _, b = min(self.by_module, key=lambda m: m[2])
            out.append((f"A frozen, rank 1 and LoRA on {name} only", self.other + b // self.rank))
        return out


def count_noised_parameters(config) -> NoisedParameters:
    """The exact count of the run's trainable parameters, from its configuration: the model is built on
    PyTorch's meta device from its config.json (no weights read), LoRA applied as at the sites, and A
    left out under a strategy that freezes it (FFA). Raises ModelLoadError when the model's
    configuration is not available locally."""
    config = infer_labels(config)
    task = build_task(config)
    m, lora = config.model, config.lora
    if m.name in TINY_MODELS:
        tok = load_tokenizer(m.name, m.allow_download)
        model_config = _tiny_config(m.name, len(tok), tok.pad_token_id)
    else:
        source = demo_model_dir() if m.name == DEMO_MODEL else m.name
        try:
            model_config = AutoConfig.from_pretrained(str(source), local_files_only=not m.allow_download)
        except OSError as err:
            raise ModelLoadError(not_found(m.name, err)) from None
    auto = AutoModelForCausalLM
    if task.peft_task_type == "SEQ_CLS":
        model_config.num_labels, auto = task.num_labels, AutoModelForSequenceClassification
    with torch.device("meta"):
        base = auto.from_config(model_config)
        model = wrap_with_lora(base, task.peft_task_type, lora.rank, lora.alpha, lora.dropout,
                               config.target_modules)
    frozen_a = bool(getattr(STRATEGIES.get(config.strategy.name), "freeze_a", False))
    head_only = config.private_head_only
    counts = {"A": 0, "B": 0, "other": 0}
    by_module: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        factor = factor_of(name)
        if not p.requires_grad or (head_only and is_lora(name)):
            continue
        which = factor[1] if factor else "other"
        if which == "A" and frozen_a:
            continue
        counts[which] += p.numel()
        if factor:
            module = by_module.setdefault(factor[0].rsplit(".", 1)[-1], [0, 0])
            module[which == "B"] += p.numel()
    total = sum(counts.values())
    modules = tuple((k, a, b) for k, (a, b) in sorted(by_module.items()))
    what = ("the head alone (privacy.trainable)" if head_only
            else f"LoRA rank {lora.rank}, strategy {config.strategy.name}")
    return NoisedParameters(total, counts["A"], counts["B"], lora.rank, modules, frozen_a, f"model {m.name}, {what}",
                            head_only)


# -- what would change it ----------------------------------------------------------------

# (units, batch) -> the plan's sigma, steps per round, rounds: the same calibration the site runs
Calibrate = Callable[[int, int], "tuple[float, int, int]"]


@dataclass(frozen=True)
class Remedies:
    units: int                  # records (units) needed at this epsilon, batch growing at the same sample rate
    batch_size: int
    noise_multiplier: float     # sigma at that size, recalibrated
    nsr: float                  # at that size: <= the target
    epsilon: float | None       # epsilon needed at this size for the target NSR (None: not computable)
    parameters_needed: int      # noised parameters for the target NSR at this size and sigma
    fewer: list[tuple[str, int, float]]   # (setting, noised parameters, NSR at this size)


def remedies(units: int, batch_size: int, noise_multiplier: float, steps: int, rounds: int, delta: float,
             accountant: str, parameters: NoisedParameters, calibrate: Calibrate,
             target: float = LEARNS) -> Remedies:
    """What would bring the NSR to `target`, each computed by the same calibration: the units needed at
    this epsilon (the expected batch grows with them at this sample rate, so sigma stays about the same;
    recalibrated, and grown until it fits), the epsilon needed at this size (the epsilon of the sigma
    that gives the target NSR at this batch), and settings with fewer noised parameters (sigma does not
    depend on d)."""
    d = parameters.total
    q = min(1.0, batch_size / units)
    batch = max(batch_size, math.ceil(noise_multiplier * math.sqrt(d) / target))
    for _ in range(20):
        n = max(units, math.ceil(batch / q))
        sigma, _, _ = calibrate(n, batch)
        nsr = noise_to_signal(sigma, d, batch)
        if nsr <= target:
            break
        batch = max(batch + 1, math.ceil(batch * nsr / target))
    else:
        raise RuntimeError("no size found that brings the noise to the target")
    wanted = target * batch_size / math.sqrt(d)   # sigma for the target NSR at this batch
    # a step of the 3rd significant digit below it: calibrating to its epsilon rounds sigma up by at most that
    unit = 10.0 ** (math.floor(math.log10(wanted)) - 2)
    wanted = (math.floor(wanted / unit) - 1) * unit
    eps: float | None = None
    for acc in dict.fromkeys((accountant, "rdp")):
        try:
            eps = epsilon_by_round(wanted, q, steps, rounds, delta, acc)[-1]
            break
        except (ValueError, RuntimeError, ArithmeticError):  # PRV can fail far out in the tails: RDP
            continue
    fewer = [(label, n_d, noise_to_signal(noise_multiplier, n_d, batch_size)) for label, n_d in parameters.fewer()]
    needed = int((target * batch_size / noise_multiplier) ** 2)
    return Remedies(n, batch, sigma, nsr, eps, needed, fewer)


def report(nsr: float, noise_multiplier: float, parameters: NoisedParameters, batch_size: int, steps: int,
           fix: Remedies | None, epsilon: float) -> str:
    """The lines `fedlora privacy plan` prints."""
    lines = ["", "  will DP-SGD learn at this size?",
             f"  noise-to-signal per step: sigma * sqrt(d) / B = {noise_multiplier:g} * sqrt({parameters.total:,})"
             f" / {batch_size} = {nsr:.2f}  (d: noised parameters, from {parameters.source})",
             "  " + sentence(nsr, steps, parameters.head_only)]
    if fix is not None:
        lines.append(f"  what would bring it to {LEARNS:.2f} (the run that learned, partly):")
        lines.append(f"    - {fix.units:,} training units at epsilon {epsilon:g}, with --batch-size {fix.batch_size} "
                     f"(the same sampling rate): sigma {fix.noise_multiplier:g}, noise-to-signal {fix.nsr:.2f}")
        lines.append("    - " + (f"epsilon {fix.epsilon:.3g} at this size and batch" if fix.epsilon is not None
                                 else "no epsilon the accountant can compute at this size"))
        lines.append(f"    - at most {fix.parameters_needed:,} noised parameters at this size and sigma "
                     f"(now {parameters.total:,}{f'; the head alone has {parameters.other:,}' if parameters.lora_a or parameters.lora_b else ''})")
        for label, n_d, r in fix.fewer:
            lines.append(f"      {label}: {n_d:,} parameters, noise-to-signal {r:.2f} ({verdict(r)})")
    lines.append(f"  ({CAVEAT})")
    return "\n".join(lines)
