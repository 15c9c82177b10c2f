"""Where a model computes and in what number format: the device, mixed precision, a 4-bit base.

- `model.device`: `auto` takes a CUDA GPU when the process sees one, else the CPU. A simulated site
  takes one only when `simulation.gpus-per-site` gives it a share: Ray hides GPUs from an actor
  that asked for none today, but says it will stop doing so, so the choice is made here.
- `train.precision`: `bf16` or `fp16` keeps the frozen base in that format and runs the forward
  passes under `torch.autocast`; the trainable tensors (LoRA factors, head) and the optimizer stay
  float32, and so does what travels.
  fp16 needs loss scaling (`torch.amp.GradScaler`) against underflowing gradients, which DP-SGD's
  per-sample clipping does not take; bf16 has float32's range and needs none.
- `model.quantization = "4bit"`: the frozen base loads in 4-bit NF4 through bitsandbytes (QLoRA,
  arXiv 2305.14314), the task head kept unquantized; the adapters train in float32 on top. Its
  layers compute in bf16 (fp16 under `train.precision = fp16`), even under fp32.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from typing import Any

import torch

from fedlora.model_sources import ModelLoadError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZATIONS = ("none", "4bit")


class ComputeUnavailable(ModelLoadError):
    """The configured device, precision or quantization is not available in this process."""


def valid_device(spec: str) -> bool:
    return bool(_DEVICE.match(spec))


def resolve_device(spec: str, gpu_allowed: bool = True) -> torch.device:
    """The device `model.device` names, here. `gpu_allowed` False (a simulated site given no GPU
    share) makes `auto` the CPU."""
    if spec == "auto":
        return torch.device("cuda" if gpu_allowed and torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ComputeUnavailable(f"model.device = {spec!r}, but this process sees no CUDA GPU "
                                     f"(torch {torch.__version__}; CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ComputeUnavailable(f"model.device = {spec!r}, but this process sees "
                                     f"{torch.cuda.device_count()} GPU(s)")
    return device


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (collation builds them on the CPU)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, precision: str):
    """The forward passes' context for `train.precision`: autocast to bf16/fp16, or nothing for fp32."""
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """Loss scaling for fp16 (small gradients underflow in half precision), None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def peak_memory(device: torch.device) -> int | None:
    """Bytes of the device's memory allocated at the peak since the last reset; None on a CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs it asynchronously; a CPU has none queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
