"""Where and in what precision the engine computes: device choice, precision resolution, autocast, images onto the device."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the served model imports this module (via inference): no torch.distributed for it
    from cifar_mlflow.training import distributed


def resolve_device(ctx: distributed.Context | None = None) -> torch.device:
    """The GPU if there is one (under torchrun: this process's own), else the CPU."""
    if ctx is not None:
        return ctx.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU features that make bf16 autocast faster than fp32 (~2x here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the device runs it natively, else fp32. Explicit choices are kept."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def precision_is_emulated(precision: str, device: torch.device) -> bool:
    """bf16 or fp16 autocast on a CPU without native bf16: emulated, 10x or more slower than fp32 (measured on an
    AVX2-only EPYC; fp16 autocast on a CPU is emulated everywhere)."""
    return device.type == "cpu" and (precision == "fp16" or (precision == "bf16" and not cpu_has_native_bf16()))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The mixed-precision context for a forward pass: none for fp32, else autocast to bf16 or fp16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def to_device_images(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]. The permuted view of an NHWC tensor already has the
    channels_last layout, so no copy is needed for the model's memory format."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
    return x.float().div_(255.0)
