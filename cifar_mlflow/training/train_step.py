"""One optimisation step (autocast forward, the configured loss, loss-scaled backward, optimiser step), the same
for training and the LR range test."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_mlflow.training.hardware import autocast, to_device_images


def l1_weights(model: nn.Module) -> list[nn.Parameter]:
    """Conv and linear weights: what an L1 penalty should shrink (not norm scales or biases)."""
    return [p for p in model.parameters() if p.ndim > 1]


def l1_penalty(weights: list[nn.Parameter]) -> torch.Tensor:
    """Sum of absolute values of the given weights, on their device (no host sync)."""
    return torch.stack([p.abs().sum() for p in weights]).sum()


class TrainStep:
    """Calling it with a batch (uint8 images (B, H, W, C), labels) takes one optimiser step on the objective:
    cross-entropy with label smoothing, plus l1 times the L1 norm of the conv and linear weights. With a
    GradScaler (fp16) the backward pass is loss-scaled, and a step whose gradients overflowed is skipped by the
    scaler. Never reads a value on the host: the caller decides when to look."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: str,
        label_smoothing: float = 0.0,
        l1: float = 0.0,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.device, self.precision = device, precision
        self.label_smoothing, self.l1 = label_smoothing, l1
        self.penalised = l1_weights(model) if l1 > 0 else []

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(objective loss, logits, labels on the device), all still attached to the device."""
        x = to_device_images(images, self.device)
        y = labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.penalised:
            loss = loss + self.l1 * l1_penalty(self.penalised)  # fp32 weights: outside autocast
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)  # unscales first; skips the step if any gradient is inf/nan
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss, logits, y
