"""The optimiser and the learning-rate schedule a training config asks for."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cifar_mlflow.config import TrainConfig, scaled_lr

# One-cycle shape: linear warm-up over the first 20% of steps, then linear decay to ~0 (Smith 2018; the
# DAWNBench ResNet recipes peak at epoch ~5 of 24). Start at peak/25 and end at peak/25/1e4 ~ 0.
ONECYCLE_PCT_START = 0.2
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4


def build_optimizer(cfg: Any, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
    """cfg: any config with optimizer, momentum and weight_decay; lr defaults to cfg's peak LR."""
    lr = _peak_lr(cfg) if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
        )
    betas = (cfg.momentum, 0.999)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)


# plateau: x0.1 after 2 epochs without a lower test loss -- in a 20-epoch budget a longer patience (the notebooks
# use 4) would leave time for at most a couple of reductions.
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.1, 2
# cyclic: triangular2 between lr/10 and lr with 2-epoch half cycles (Smith 2017 suggests 2-10 epochs); the
# amplitude halves every cycle, so the LR settles low by the end as one-cycle's does.
CYCLIC_BASE_DIV, CYCLIC_HALF_EPOCHS = 10.0, 2


@dataclass
class Schedule:
    """A learning-rate scheduler and when to step it: after every optimiser step, or once per epoch on the
    test loss (ReduceLROnPlateau)."""

    scheduler: Any
    per_step: bool

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self, test_loss: float) -> None:
        if not self.per_step:
            self.scheduler.step(test_loss)


def _peak_lr(cfg: TrainConfig) -> float:
    # cfg.lr is a number, "scaled" (a function of the batch size) or "auto"; training replaces "auto" with the
    # range test's value (jobs.lr_find.resolve_auto_lr) before it builds the scheduler, and config validation makes
    # every number a float
    if cfg.lr == "scaled":
        return scaled_lr(cfg.batch_size)
    assert isinstance(cfg.lr, float), f"lr={cfg.lr!r} must be resolved to a number before a schedule is built"
    return cfg.lr


def _warmup_fraction(total_steps: int) -> float:
    """ONECYCLE_PCT_START, except where torch's OneCycleLR would divide by zero: its warm-up phase ends at step
    pct * total - 1, and one ending at step 0 has zero length (5 steps in all at 0.2, e.g. one epoch of 320
    images at batch 64). There the warm-up takes two steps instead."""
    return ONECYCLE_PCT_START if total_steps * ONECYCLE_PCT_START != 1 else 2 / total_steps


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Schedule:
    """cfg.scheduler over cfg.epochs * steps_per_epoch optimiser steps, peaking at (or starting from) cfg.lr."""
    sched = torch.optim.lr_scheduler
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        return Schedule(
            sched.OneCycleLR(
                optimizer,
                max_lr=_peak_lr(cfg),
                total_steps=total,
                pct_start=_warmup_fraction(total),
                anneal_strategy="linear",
                div_factor=ONECYCLE_DIV_FACTOR,
                final_div_factor=ONECYCLE_FINAL_DIV_FACTOR,
                cycle_momentum=False,
            ),
            per_step=True,
        )  # keep the `momentum` parameter as given instead of cycling it
    if cfg.scheduler == "cosine":
        return Schedule(sched.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0), per_step=True)
    if cfg.scheduler == "cyclic":
        return Schedule(
            sched.CyclicLR(
                optimizer,
                base_lr=_peak_lr(cfg) / CYCLIC_BASE_DIV,
                max_lr=_peak_lr(cfg),
                step_size_up=max(1, CYCLIC_HALF_EPOCHS * steps_per_epoch),
                mode="triangular2",
                cycle_momentum=False,
            ),
            per_step=True,
        )  # cycling momentum would fight Adam's betas
    if cfg.scheduler == "plateau":
        return Schedule(
            sched.ReduceLROnPlateau(optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE),
            per_step=False,
        )
    return Schedule(sched.LambdaLR(optimizer, lambda _: 1.0), per_step=True)
