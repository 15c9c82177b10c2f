"""DP-SGD as a wrapper of the one training loop (fedlora.training), on the trainable tensors of a cached PEFT model.

`DPSGD` is the loop's step method under differential privacy, the Opacus way
(`make_private` wraps a model, an optimizer and a data loader; this wraps the
loop's model, optimizer and batches):

- batches: Poisson sampling of privacy units (units.py); an empty batch is
  still a step, with noise only, so every drawn batch is accounted;
- backward: per-sample gradients from Opacus' hooks (in float32 whatever the
  forward's precision), or ghost clipping (float32 forward passes only);
- step: each unit's gradient clipped to C, Gaussian noise σ·k·C added to the
  sum (k = records one unit may put into a step), then a data-independent
  extra term (FedProx's proximal term) joins the noised gradient, which costs
  no privacy;
- after the loop: the noised steps must equal the planned ones, and every
  trainable tensor must have moved, or nothing is released (Opacus #820:
  adapters silently not training while epsilon accrues).

The site's PeftModel is cached for the whole process and may serve several
simulated sites in turn, so the hooks are attached without replacing the model
object and removed when the loop ends: they never stack across rounds or sites.
The loss is the task's per-sequence loss: one sample's gradient never depends
on another's length.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from fedlora.privacy.units import PrivacyUnits, poisson_batches
from fedlora.training import ExtraLoss, trainable

GRAD_SAMPLE_MODES = ("hooks", "ghost")


class ParametersDidNotTrain(RuntimeError):
    """A trainable tensor did not change during DP-SGD: the update would be wrong."""


@dataclass(frozen=True)
class DPSettings:
    max_grad_norm: float          # per-record clip norm C
    grad_sample_mode: str = "hooks"
    # Opacus' secure_mode: each noise value combines several Gaussian draws, which defeats the
    # floating-point attack on Gaussian sampling (arXiv 2107.10138, 2112.05307). It needs no torchcsprng
    # (only PrivacyEngine's own generator does); `fedlora bench --only privacy` measures its cost.
    secure_mode: bool = True


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded from the OS: noise and sampling must not be reproducible
    from anything in the run config, or the coordinator could subtract the noise."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class DPSGD:
    """The loop's steps under DP-SGD: `noise_multiplier` is the accounted σ per unit of privacy."""

    def __init__(self, units: PrivacyUnits, sample_rate: float, noise_multiplier: float, settings: DPSettings,
                 noise_generator: torch.Generator | None = None, sampling_generator: torch.Generator | None = None):
        if settings.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode {settings.grad_sample_mode!r} not one of {GRAD_SAMPLE_MODES}")
        self.units, self.sample_rate, self.settings = units, sample_rate, settings
        self.expected_records = max(units.expected_records(sample_rate), 1e-6)
        self.effective_sigma = noise_multiplier * units.sensitivity_factor
        self.noise_generator = noise_generator  # drawn where the gradients are, on attaching (a GPU's own)
        self.sampling_generator = sampling_generator or secret_generator()
        self.noised_steps = 0

    @property
    def ghost(self) -> bool:
        return self.settings.grad_sample_mode == "ghost"

    @property
    def noise_std(self) -> float:
        """Std of the noise on each coordinate of the averaged gradient."""
        return self.effective_sigma * self.settings.max_grad_norm / self.expected_records

    # -- the loop's step method --------------------------------------------------------------
    def attach(self, model, optimizer: torch.optim.Optimizer, extra_loss: ExtraLoss | None = None) -> None:
        """Hook `model` and wrap `optimizer` (clip per sample, noise) until `detach`."""
        mode, clip = self.settings.grad_sample_mode, self.settings.max_grad_norm
        extra = {"max_grad_norm": clip, "use_ghost_clipping": True} if self.ghost else {}
        self.model, self.params = model, trainable(model)
        if not self.params or any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("DP-SGD needs float32 trainable tensors to clip and noise (fedlora.models keeps them so)")
        self.noise_generator = self.noise_generator or secret_generator(self.params[0].device)
        self.before = [p.detach().clone() for p in self.params]
        self.hooks = prepare_module(model, mode, wrap_model=False, batch_first=True, loss_reduction="mean", **extra)
        self.optimizer = get_optimizer_class("flat", False, mode)(
            optimizer, noise_multiplier=self.effective_sigma, max_grad_norm=clip,
            expected_batch_size=self.expected_records, loss_reduction="mean", generator=self.noise_generator,
            secure_mode=self.settings.secure_mode)

        def after_noise(_optimizer) -> None:  # once per step, after clipping and noise
            self.noised_steps += 1
            if extra_loss is not None:
                grads = torch.autograd.grad(extra_loss(model), self.params, allow_unused=True)
                for p, g in zip(self.params, grads):
                    if g is not None:
                        p.grad = p.grad + g

        self.optimizer.attach_step_hook(after_noise)

    def batches(self, steps: int) -> Iterator[list[int]]:
        return poisson_batches(self.units, self.sample_rate, steps, self.sampling_generator)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, losses: torch.Tensor | None) -> None:
        if losses is None:
            # No forward pass on zero rows; zero per-sample gradients make Opacus add noise only.
            for p in self.optimizer.params:
                if self.ghost:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        elif self.ghost:
            DPTensorFastGradientClipping(self.hooks, self.optimizer, losses, "mean").backward()
        else:
            losses.mean().backward()
            # Under bf16 autocast the hooks see bf16 activations and gradients. Clipping must measure
            # and sum the very values it releases, in the parameters' float32, or a norm rounded
            # down in bf16 would let a record's gradient exceed C.
            for p in self.params:
                sample = getattr(p, "grad_sample", None)  # one tensor: gradients never accumulate here
                if isinstance(sample, torch.Tensor) and sample.dtype != torch.float32:
                    p.grad_sample = sample.float()

    def step(self) -> None:
        self.optimizer.step()

    def detach(self, completed_steps: int | None) -> dict[str, Any]:
        """Remove the hooks; after a completed loop, check the steps and that every tensor trained."""
        self.hooks.cleanup()  # removes the hooks and Opacus' per-parameter attributes
        for p in self.params:
            p.grad = None
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        if completed_steps is None:
            return {}
        if self.noised_steps != completed_steps:
            raise RuntimeError(f"DP-SGD took {self.noised_steps} noised steps, the loop {completed_steps}: "
                               "accounting would be wrong")
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        frozen = [n for n, p, b in zip(names, self.params, self.before) if torch.equal(p.detach(), b)]
        if frozen:
            raise ParametersDidNotTrain(f"{len(frozen)} trainable tensors did not change under DP-SGD "
                                        f"(first: {frozen[:3]}); the update is not released")
        return {"noise_std": self.noise_std}
