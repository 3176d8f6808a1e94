"""Augmentation presets: named albumentations 2.x recipes on uint8 HWC images, and the batched tensor twins of
the simple ones for data resident on the device.

Normalisation is not here: it lives inside the model, so the pipelines only move and mask pixels, and the
test pipeline is the identity. Argument names are albumentations 2.x ones (`fill`, `num_holes_range`, ...):
the 1.x names (`max_holes`, `fill_value`) are silently ignored by 2.x.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import albumentations as A
import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

PAD = 4  # reflect-pad 4 then crop 32: the standard CIFAR translation of up to 4 px (He et al. 2016)
CUTOUT = 16  # one 16x16 hole: the size DeVries & Taylor (2017) found best for CIFAR-10


def cutout_fill(mean: Sequence[float]) -> tuple[float, ...]:
    """Fill holes with the dataset mean: after the model's normalisation they are exactly 0, as in the paper."""
    return tuple(round(255.0 * m) for m in mean)


HEAVY_HOLE = 16  # "half-size patch": a 16x16 hole is half the 32-px side, as in the course notebooks
ROTATE = 5  # degrees: small enough that CIFAR's upright objects stay upright


def _pad_crop() -> list[A.BasicTransform]:
    return [A.PadIfNeeded(32 + 2 * PAD, 32 + 2 * PAD, border_mode=cv2.BORDER_REFLECT_101), A.RandomCrop(32, 32)]


class Cutout(A.CoarseDropout):
    """Cutout as DeVries & Taylor (2017) define it: the hole's centre is drawn uniformly over the whole image and
    the hole is clipped at the border, so it may extend past it (albumentations' CoarseDropout keeps holes fully
    inside, which for a 16x16 hole on 32x32 means the image centre is always covered). Filled with the dataset
    mean, i.e. 0 after the model's normalisation, as the paper's mask applied to normalised images is."""

    note = (
        "hole centred anywhere in the image and clipped at the border (DeVries & Taylor 2017, as their code "
        "does), filled with the dataset mean = 0 after normalisation"
    )

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        size_h = self.py_random.randint(*self.hole_height_range)
        size_w = self.py_random.randint(*self.hole_width_range)
        cy = self.random_generator.integers(0, height)
        cx = self.random_generator.integers(0, width)
        y0, x0 = max(cy - size_h // 2, 0), max(cx - size_w // 2, 0)
        y1, x1 = min(cy + size_h - size_h // 2, height), min(cx + size_w - size_w // 2, width)
        return {"holes": np.array([[x0, y0, x1, y1]]), "seed": self.random_generator.integers(0, 2**32 - 1)}


def _cutout(mean: Sequence[float], size: int = CUTOUT, p: float = 1.0) -> Cutout:
    return Cutout(
        num_holes_range=(1, 1),
        hole_height_range=(size, size),
        hole_width_range=(size, size),
        fill=cutout_fill(mean),
        p=p,
    )


def build_train_transform(preset: str, mean: Sequence[float]) -> A.Compose | None:
    """The training pipeline for a preset name, or None for `none`."""
    presets = {
        # reflect-pad 4 + crop 32, flip, one 16x16 cutout: the short-schedule ResNet recipe
        "standard": lambda: [*_pad_crop(), A.HorizontalFlip(p=0.5), _cutout(mean)],
        # flip + coarse dropout, no translation
        "flip-cutout": lambda: [A.HorizontalFlip(p=0.5), _cutout(mean, p=0.5)],
        # the assignment-notebook recipe: flip, shift/scale/rotate (as Affine: ShiftScaleRotate is deprecated),
        # a half-size hole, colour jitter with the hue bounded (CIFAR colours carry class information), to-gray
        "heavy": lambda: [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                translate_percent=(-0.1, 0.1),
                scale=(0.9, 1.1),
                rotate=(-15, 15),
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.5,
            ),
            _cutout(mean, HEAVY_HOLE, p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.5),
            A.ToGray(p=0.1),
        ],
        # pad-crop + 16x16 cutout + rotate +-5 degrees
        "rotate": lambda: [
            *_pad_crop(),
            _cutout(mean),
            A.Rotate(limit=ROTATE, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        ],
    }
    if preset == "none":
        return None
    if preset not in presets:
        raise ValueError(f"augment={preset!r} is not allowed: expected one of {', '.join(presets)}, none")
    return A.Compose(presets[preset]())


def describe(transform: A.Compose | None) -> str:
    """The exact transform list, one per line, for logging with the run."""
    if transform is None:
        return "(no augmentation)\n"
    return "".join(f"{t!r}\n" + (f"  # {t.note}\n" if hasattr(t, "note") else "") for t in transform.transforms)


# ---------------------------------------------------------------------------------------------------------------
# The same presets as batched tensor ops (the airbench way): for data resident on the device, where per-image
# albumentations calls in CPU workers would be the bottleneck. Each draws from exactly the distribution of its
# albumentations twin above (tests/test_device_loader.py compares them).


@dataclass(frozen=True)
class BatchRecipe:
    """pad: reflect-pad then random crop back to size (0 = no translation); flip: probability of a horizontal
    flip; cutout: probability of one hole of side `hole` centred anywhere (DeVries & Taylor)."""

    pad: int = 0
    flip: float = 0.0
    cutout: float = 0.0
    hole: int = CUTOUT


BATCH_RECIPES = {
    "standard": BatchRecipe(pad=PAD, flip=0.5, cutout=1.0),
    "flip-cutout": BatchRecipe(flip=0.5, cutout=0.5),
    "none": BatchRecipe(),
}


def batch_augment(
    padded: torch.Tensor, index: torch.Tensor, recipe: BatchRecipe, fill: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Augmented uint8 images (B, S, S, C) for rows `index` of `padded` (N, S + 2 pad, S + 2 pad, C, already
    reflect-padded by recipe.pad), all on one device. Crop offsets, flips and hole centres are drawn per image
    from `generator`; the crop and the flip are one gather (a flip is the crop's columns in reverse order)."""
    import torch

    device, b = padded.device, len(index)
    size = padded.shape[1] - 2 * recipe.pad
    span = torch.arange(size, device=device)

    def draw(high: int) -> torch.Tensor:
        return torch.randint(0, high, (b,), device=device, generator=generator)

    def chance(p: float) -> torch.Tensor:
        return torch.rand(b, device=device, generator=generator) < p

    rows = draw(2 * recipe.pad + 1)[:, None] + span  # crop offset 0..2*pad, as RandomCrop after padding
    cols = draw(2 * recipe.pad + 1)[:, None] + span
    cols = torch.where(chance(recipe.flip)[:, None], cols.flip(1), cols)
    out = padded[index[:, None, None], rows[:, :, None], cols[:, None, :]]
    if recipe.cutout > 0:
        half = recipe.hole // 2
        cy, cx = draw(size)[:, None], draw(size)[:, None]
        inside_rows = (span >= cy - half) & (span < cy + recipe.hole - half)
        inside_cols = (span >= cx - half) & (span < cx + recipe.hole - half)
        hole = inside_rows[:, :, None] & inside_cols[:, None, :] & chance(recipe.cutout)[:, None, None]
        out = torch.where(hole[..., None], fill, out)
    return out
