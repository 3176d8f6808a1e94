"""Augmentation presets: named albumentations 2.x recipes on uint8 HWC images.

Normalisation is not here: it lives inside the model, so the pipelines only move and mask pixels, and the
test pipeline is the identity. Argument names are albumentations 2.x ones (`fill`, `num_holes_range`, ...):
the 1.x names (`max_holes`, `fill_value`) are silently ignored by 2.x.
"""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2

PAD = 4          # reflect-pad 4 then crop 32: the standard CIFAR translation of up to 4 px (He et al. 2016)
CUTOUT = 16      # one 16x16 hole: the size DeVries & Taylor (2017) found best for CIFAR-10


def cutout_fill(mean: Sequence[float]) -> tuple[float, ...]:
    """Fill holes with the dataset mean: after the model's normalisation they are exactly 0, as in the paper."""
    return tuple(round(255.0 * m) for m in mean)


def build_train_transform(preset: str, mean: Sequence[float]) -> A.Compose | None:
    """The training pipeline for a preset name, or None for `none`."""
    if preset == "none":
        return None
    if preset == "standard":
        return A.Compose([
            A.PadIfNeeded(32 + 2 * PAD, 32 + 2 * PAD, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(32, 32),
            A.HorizontalFlip(p=0.5),
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(CUTOUT, CUTOUT),
                            hole_width_range=(CUTOUT, CUTOUT), fill=cutout_fill(mean), p=1.0),
        ])
    raise ValueError(f"augment={preset!r} is not allowed: expected one of standard, none")


def describe(transform: A.Compose | None) -> str:
    """The exact transform list, one per line, for logging with the run."""
    if transform is None:
        return "(no augmentation)\n"
    return "".join(f"{t!r}\n" for t in transform.transforms)
