"""LR range test (Smith 2017; davidtvs/pytorch-lr-finder): raise the learning rate exponentially over a few
mini-batches, record the loss, stop once it diverges, then put the model and optimiser back exactly as they
were. The suggestion is a pure function of the recorded curve.

Suggestion rule: **steepest descent before the minimum, on a centred fit**. Around every point, fit a straight
line to the raw losses against log10(lr) over a quarter of a decade on either side (WINDOW); its value is the
smoothed curve and its slope the descent rate. Search from the first tenth of the sweep up to the smoothed
curve's minimum and pick the LR where the loss falls fastest. There the LR is large enough to make quick
progress yet clearly below the region where the loss turns up; the minimum itself sits at the edge of
divergence.

Why not the previous rule (a bias-corrected EMA with weight 0.05, np.gradient between neighbouring points,
searched from the 4th point): measured on a recorded sweep on the digits set at batch 64 (tests/data/), the
per-step loss jitters by 0.085 (std of step-to-step differences) between points 0.06 decades apart, a slope
noise of +-1.4 per decade, while the loss truly falls by only 0.1-0.3 per decade over the first three decades
(0.9 at its steepest). At the 4th point the bias-corrected EMA averages fewer than 4 losses and np.gradient is
one-sided there, so the first allowed point often carries the steepest "descent" of all: with the network's
earlier initialisation it suggested exactly that point, 1.52e-5. Later on, the EMA lags by ~20 steps (over a
decade of LR), so its slope belongs to smaller LRs. A centred least-squares slope over a fixed width of
log10(lr) has neither problem. The EMA still decides when to stop (that must be causal).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_mlflow.errors import ConfigError
from cifar_mlflow.training import hardware, stop, train_step

SMOOTHING = 0.05  # EMA weight of each new loss for the stop rule (pytorch-lr-finder's smooth_f)
DIVERGE = 4.0  # stop when the EMA exceeds 4x its best: the run is past any useful LR
SKIP_START = 3  # the stop rule ignores the EMA's first points (it averages only a few losses there)
WINDOW = 0.5  # decades of LR in each centred linear fit: ~8 points of a 100-step sweep over 6 decades
SKIP = 0.1  # the suggestion ignores the first tenth of the sweep (fastai does the same)
MIN_POINTS = 8


@dataclass(frozen=True)
class RangeTestResult:
    lrs: list[float]
    losses: list[float]  # raw per-batch training loss
    smoothed: list[float]  # the centred linear fit the suggestion is read from (nan where it has no points)
    suggested_lr: float
    diverged: bool  # stopped early because the loss blew up


def centred_fit(lrs: Sequence[float], losses: Sequence[float], window: float = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """(level, slope) at every point: a least-squares line through the finite losses within window/2 decades
    of its LR (widened to two sweep steps on either side for a sparse sweep), against log10(lr). Centred, so it
    does not lag as an EMA does; nan where fewer than 3 points."""
    x = np.log10(np.asarray(lrs, np.float64))
    y = np.asarray(losses, np.float64)
    level, slope = np.full(len(x), np.nan), np.full(len(x), np.nan)
    ok = np.isfinite(y)
    # a sparse sweep: two steps either side. 2.5 steps, not 2 plus a hair: an LR read back from a logged table
    # (curve.json keeps 10 decimals, ~5 digits of 1e-5) must fall on the same side of the edge as the exact one
    half = max(window / 2 * (1 + 1e-9), 2.5 * float(np.median(np.diff(x))) if len(x) > 1 else 0.0)
    for i, xi in enumerate(x):
        near = ok & (np.abs(x - xi) <= half)
        if near.sum() >= 3 and np.ptp(x[near]) > 0:
            slope[i], level[i] = np.polyfit(x[near] - xi, y[near], 1)
    return level, slope


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """Steepest descent of the centred fit, searched from the first tenth of the sweep to the fit's minimum
    (module doc). losses: the raw per-step losses."""
    if len(lrs) < MIN_POINTS or len(lrs) != len(losses):
        raise ValueError(f"need at least {MIN_POINTS} points of (lr, loss) to suggest an LR, got {len(lrs)}")
    return _steepest_before_minimum(lrs, *centred_fit(lrs, losses))


def _steepest_before_minimum(lrs: Sequence[float], level: np.ndarray, slope: np.ndarray) -> float:
    start = max(1, int(SKIP * len(lrs)))
    if not np.isfinite(level[start:]).any():
        raise ValueError("the range test recorded no finite loss to suggest an LR from")
    lowest = start + int(np.nanargmin(level[start:]))
    candidates = np.where(np.isfinite(slope[start : lowest + 1]), slope[start : lowest + 1], np.inf)
    return float(lrs[start + int(np.argmin(candidates))])


def _cycle(loader: Any):
    epoch = 0
    while True:
        epoch += 1
        loader.sampler.set_epoch(epoch)
        yield from loader


@stop.deferred()
def range_test(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: str,
    *,
    start_lr: float,
    end_lr: float,
    num_iter: int,
    label_smoothing: float = 0.0,
    l1: float = 0.0,
) -> RangeTestResult:
    """Exponential sweep from start_lr to end_lr over num_iter training steps (looping over the loader as needed).
    Each step is training's own (train_step.TrainStep: the same loss, and loss scaling under fp16 with a
    GradScaler of its own, dropped afterwards). Model and optimiser state (weights, BatchNorm statistics,
    momentum buffers, LR) are restored afterwards.
    Reads the loss on the host every step: that is the point of the test, and it is not the training loop."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    scaler = hardware.grad_scaler(device, precision)
    step = train_step.TrainStep(model, optimizer, device, precision, label_smoothing, l1, scaler)
    ratio = (end_lr / start_lr) ** (1.0 / max(num_iter - 1, 1))
    lrs: list[float] = []
    losses: list[float] = []
    avg, best, diverged = 0.0, math.inf, False
    model.train()
    try:
        for i, (images, labels) in zip(range(num_iter), _cycle(loader)):
            stop.check()
            lr = start_lr * ratio**i
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, _, _ = step(images, labels)
            value = loss.item()
            avg = SMOOTHING * value + (1 - SMOOTHING) * avg
            smooth = avg / (1 - (1 - SMOOTHING) ** (i + 1))  # bias correction of the EMA
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(smooth) or (i >= SKIP_START and smooth > DIVERGE * best):
                diverged = True
                break
            best = min(best, smooth)
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
    if len(lrs) < MIN_POINTS:
        raise ConfigError(
            f"start_lr={start_lr!r} is not allowed: the loss diverged after {len(lrs)} steps of the "
            "range test; expected a start_lr below any useful LR (e.g. 1e-5)"
        )
    level, slope = centred_fit(lrs, losses)
    return RangeTestResult(lrs, losses, level.tolist(), _steepest_before_minimum(lrs, level, slope), diverged)


# Clamp for `lr=auto`: a range test on a few hundred images can point anywhere; these bounds keep a one-cycle
# peak in the region where each optimiser is known to train CIFAR ResNets at all.
SAFE_RANGE = {"sgd": (0.01, 1.0), "adam": (1e-4, 1e-2), "adamw": (1e-4, 1e-2)}


def clamp_lr(lr: float, optimizer: str) -> float:
    low, high = SAFE_RANGE[optimizer]
    return float(min(max(lr, low), high))
