"""LR range test (Smith 2017; davidtvs/pytorch-lr-finder): raise the learning rate exponentially over a few
mini-batches, record the smoothed loss, stop once it diverges, then put the model and optimiser back exactly as
they were. The suggestion is a pure function of the recorded curve.

Suggestion rule: **steepest descent before the minimum**. Take the smoothed loss as a function of log10(lr) and
pick the LR where it falls fastest, searching only up to the loss minimum. Why: there the LR is large enough to
make quick progress yet clearly below the region where the loss turns up and diverges; the loss minimum itself
already sits at the edge of divergence, and the raw curve is too noisy to use without smoothing.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_mlflow import engine
from cifar_mlflow.errors import ConfigError

SMOOTHING = 0.05     # EMA weight of each new loss (pytorch-lr-finder's smooth_f)
DIVERGE = 4.0        # stop when the smoothed loss exceeds 4x its best: the run is past any useful LR
SKIP_START = 3       # the first points are dominated by the EMA warm-up


@dataclass(frozen=True)
class RangeTestResult:
    lrs: list[float]
    losses: list[float]        # raw per-batch training loss
    smoothed: list[float]      # bias-corrected exponential moving average of losses
    suggested_lr: float
    diverged: bool             # stopped early because the loss blew up


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float], skip_start: int = SKIP_START) -> float:
    """Steepest descent of the smoothed loss over log10(lr), searched before the loss minimum (module doc)."""
    lrs_a, loss_a = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    if len(lrs_a) < skip_start + 3 or len(lrs_a) != len(loss_a):
        raise ValueError(f"need at least {skip_start + 3} points of (lr, loss) to suggest an LR, got {len(lrs_a)}")
    finite = np.isfinite(loss_a)
    last = int(np.argmin(np.where(finite, loss_a, np.inf)))
    stop = max(last + 1, skip_start + 3)
    x, y = np.log10(lrs_a[skip_start:stop]), loss_a[skip_start:stop]
    slope = np.gradient(y, x)
    return float(lrs_a[skip_start + int(np.argmin(slope))])


def _cycle(loader: Any):
    epoch = 0
    while True:
        epoch += 1
        loader.sampler.set_epoch(epoch)
        yield from loader


def range_test(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, device: torch.device,
               precision: str, *, start_lr: float, end_lr: float, num_iter: int, label_smoothing: float = 0.0,
               l1: float = 0.0) -> RangeTestResult:
    """Exponential sweep from start_lr to end_lr over num_iter training steps (looping over the loader as needed).
    Model and optimiser state (weights, BatchNorm statistics, momentum buffers, LR) are restored afterwards.
    Reads the loss on the host every step: that is the point of the test, and it is not the training loop."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    penalised = engine.l1_weights(model) if l1 > 0 else []
    ratio = (end_lr / start_lr) ** (1.0 / max(num_iter - 1, 1))
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best, diverged = 0.0, math.inf, False
    model.train()
    try:
        for i, (images, labels) in zip(range(num_iter), _cycle(loader)):
            lr = start_lr * ratio ** i
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = engine.to_device_images(images, device)
            y = labels.to(device, non_blocking=True)
            with engine.autocast(device, precision):
                loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            if penalised:
                loss = loss + l1 * engine.l1_penalty(penalised)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            avg = SMOOTHING * value + (1 - SMOOTHING) * avg
            smooth = avg / (1 - (1 - SMOOTHING) ** (i + 1))      # bias correction of the EMA
            lrs.append(lr)
            losses.append(value)
            smoothed.append(smooth)
            if not math.isfinite(smooth) or (i >= SKIP_START and smooth > DIVERGE * best):
                diverged = True
                break
            best = min(best, smooth)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
    if len(lrs) < SKIP_START + 3:
        raise ConfigError(f"start_lr={start_lr!r} is not allowed: the loss diverged after {len(lrs)} steps of the "
                          "range test; expected a start_lr below any useful LR (e.g. 1e-5)")
    return RangeTestResult(lrs, losses, smoothed, suggest_lr(lrs, smoothed), diverged)


# Clamp for `lr=auto`: a range test on a few hundred images can point anywhere; these bounds keep a one-cycle
# peak in the region where each optimiser is known to train CIFAR ResNets at all.
SAFE_RANGE = {"sgd": (0.01, 1.0), "adam": (1e-4, 1e-2), "adamw": (1e-4, 1e-2)}


def clamp_lr(lr: float, optimizer: str) -> float:
    low, high = SAFE_RANGE[optimizer]
    return float(min(max(lr, low), high))
