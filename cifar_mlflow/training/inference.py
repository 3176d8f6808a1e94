"""The one inference loop: batches -> device -> autocast -> fp32 logits, optionally with horizontal-flip TTA.
Training's test metrics, flip TTA, the analysis entry point and models.predict_proba all go through it, so they
compute alike. (The served model runs its own few lines, tracking/served_model.py, as it must not import this
package; tests compare its probabilities with predict_proba's.)"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from cifar_mlflow.training.hardware import autocast, to_device_images


def model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, C) as the loaders make them, or float (B, C, H, W) in [0, 1] as the model takes them
    (the served model's input): float (B, C, H, W) in [0, 1] on the device, in channels_last."""
    if images.dtype == torch.uint8:
        return to_device_images(images, device)
    return images.to(device).contiguous(memory_format=torch.channels_last)


def logits(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, Any]],
    device: torch.device,
    precision: str,
    flip: bool = False,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """For each (images, labels) batch, (fp32 logits (B, C), labels) in eval mode without gradients; labels
    are moved to the device when they are a tensor, and passed on as they are otherwise (e.g. None).
    flip: logits (2, B, C), of the images and of their horizontal mirrors (two forward passes, not one
    of twice the batch: each pass computes exactly what it computes without flip)."""
    model.eval()
    with torch.inference_mode():
        for images, labels in batches:
            x = model_input(images, device)
            y = labels.to(device, non_blocking=True) if isinstance(labels, torch.Tensor) else labels
            with autocast(device, precision):
                out = model(x)
                mirrored = model(torch.flip(x, dims=[3])) if flip else None
            yield (out.float() if mirrored is None else torch.stack([out.float(), mirrored.float()])), y
