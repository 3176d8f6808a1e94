"""Training engine: device and precision choice, optimiser and schedule, train_one_epoch / evaluate / fit.

Knows nothing of MLflow: fit() returns the per-epoch metrics and calls an optional `on_epoch_end` callback.
The hot loop never syncs with the host: losses and correct counts accumulate in device tensors and are read
once per epoch.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_mlflow.config import TrainConfig

# One-cycle shape: linear warm-up over the first 20% of steps, then linear decay to ~0 (Smith 2018; the
# DAWNBench ResNet recipes peak at epoch ~5 of 24). Start at peak/25 and end at peak/25/1e4 ~ 0.
ONECYCLE_PCT_START = 0.2
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4

Metrics = dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device() -> torch.device:
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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(cfg: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    betas = (cfg.momentum, 0.999)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """A per-step schedule (stepped after every optimiser step)."""
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=ONECYCLE_PCT_START,
            anneal_strategy="linear", div_factor=ONECYCLE_DIV_FACTOR, final_div_factor=ONECYCLE_FINAL_DIV_FACTOR,
            cycle_momentum=False)  # keep the `momentum` parameter as given instead of cycling it
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def to_device_images(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]. The permuted view of an NHWC tensor already has the
    channels_last layout, so no copy is needed for the model's memory format."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def _progress(loader: Any, desc: str) -> Any:
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in CI logs.
    return tqdm(loader, desc=desc, unit="batch", leave=False, disable=None, mininterval=1.0)


def train_one_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    device: torch.device, precision: str, label_smoothing: float,
                    scaler: torch.amp.GradScaler | None = None, desc: str = "train") -> Metrics:
    """One pass over loader. Returns train/loss (plain cross-entropy, comparable with test/loss; the optimised
    objective adds label smoothing), train/accuracy, train/images_per_sec and lr (the LR of the epoch's last step)."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, lr = 0, float(optimizer.param_groups[0]["lr"])
    start = time.perf_counter()
    for images, labels in _progress(loader, desc):
        x = to_device_images(images, device)
        y = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]   # the LR this step used (a Python float: no sync)
        scheduler.step()
        with torch.no_grad():
            logits = logits.detach().float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
        seen += len(labels)
    total_loss, total_correct = loss_sum.item(), correct.item()  # the epoch's one host sync
    elapsed = time.perf_counter() - start
    return {"train/loss": total_loss / max(seen, 1), "train/accuracy": total_correct / max(seen, 1),
            "train/images_per_sec": seen / elapsed if elapsed > 0 else 0.0,
            "lr": float(lr)}


def eval_logits(model: nn.Module, loader: Any, device: torch.device, precision: str,
                desc: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, labels) per batch, on the device, in eval mode without gradients. The one evaluation path:
    training's test metrics and the analysis entry point both go through it, so they agree exactly."""
    model.eval()
    with torch.inference_mode():
        for images, labels in _progress(loader, desc):
            x = to_device_images(images, device)
            y = labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            yield logits.float(), y


def evaluate(model: nn.Module, loader: Any, device: torch.device, precision: str, desc: str = "test") -> Metrics:
    """Plain cross-entropy and accuracy over every sample of loader."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for logits, y in eval_logits(model, loader, device, precision, desc):
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(y)
    return {"test/loss": loss_sum.item() / max(seen, 1), "test/accuracy": correct.item() / max(seen, 1)}


@dataclass
class FitResult:
    history: list[Metrics]      # one dict per epoch, epoch 1 first
    final: Metrics              # the last epoch's metrics


def fit(model: nn.Module, train_loader: Any, test_loader: Any, cfg: TrainConfig, device: torch.device,
        precision: str, on_epoch_end: Callable[[int, Metrics], None] | None = None,
        log: Callable[[str], None] = print) -> FitResult:
    """Train for cfg.epochs, evaluating after each epoch; on_epoch_end(epoch, metrics) gets 1-based epochs."""
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    history: list[Metrics] = []
    for epoch in range(1, cfg.epochs + 1):
        train_loader.sampler.set_epoch(epoch)
        metrics = train_one_epoch(model, train_loader, optimizer, scheduler, device, precision,
                                  cfg.label_smoothing, scaler, desc=f"epoch {epoch}/{cfg.epochs} train")
        metrics.update(evaluate(model, test_loader, device, precision, desc=f"epoch {epoch}/{cfg.epochs} test"))
        history.append(metrics)
        log(f"epoch {epoch}/{cfg.epochs}  train loss {metrics['train/loss']:.4f} acc {metrics['train/accuracy']:.4f}"
            f"  test loss {metrics['test/loss']:.4f} acc {metrics['test/accuracy']:.4f}"
            f"  lr {metrics['lr']:.3g}  {metrics['train/images_per_sec']:.0f} img/s")
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite metrics at epoch {epoch}: {metrics}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    return FitResult(history, history[-1])
