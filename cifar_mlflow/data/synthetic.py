"""The `synthetic` dataset: deterministic generated images (a coloured shape per class), a stand-in with
CIFAR-10's sizes for plumbing and speed runs.
"""

from __future__ import annotations

import numpy as np

from cifar_mlflow.data.dataset import NUM_CLASSES, Dataset, Split

SYNTHETIC_CLASSES = (
    "red-disc",
    "green-square",
    "blue-triangle",
    "yellow-cross",
    "magenta-ring",
    "cyan-hbar",
    "orange-vbar",
    "purple-diamond",
    "white-x",
    "lime-frame",
)
# Same sizes as CIFAR-10 so that synthetic is a drop-in stand-in; only the first N requested are rendered.
SYNTHETIC_SIZES = {"train": 50_000, "test": 10_000}

_PALETTE = np.array(
    [
        [220, 40, 40],
        [40, 200, 60],
        [50, 80, 230],
        [235, 220, 40],
        [220, 50, 220],
        [40, 220, 230],
        [250, 140, 20],
        [140, 50, 200],
        [245, 245, 245],
        [160, 250, 40],
    ],
    np.float32,
)
_YY, _XX = np.mgrid[0:32, 0:32].astype(np.float32)


def _shape_mask(cls: int, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    ax, ay, d = np.abs(dx), np.abs(dy), np.hypot(dx, dy)
    masks = (
        d <= r,  # disc
        (ax <= r * 0.85) & (ay <= r * 0.85),  # square
        (dy <= r * 0.7) & (dy >= -r) & (ax <= (dy + r) * 0.6),  # triangle
        (ax <= r * 0.3) & (ay <= r) | (ay <= r * 0.3) & (ax <= r),  # cross
        (d <= r) & (d >= r * 0.55),  # ring
        (ay <= r * 0.35) & (ax <= r * 1.2),  # horizontal bar
        (ax <= r * 0.35) & (ay <= r * 1.2),  # vertical bar
        ax + ay <= r,  # diamond
        (np.abs(dx - dy) <= r * 0.35) & (d <= r) | (np.abs(dx + dy) <= r * 0.35) & (d <= r),  # x
        (np.maximum(ax, ay) <= r) & (np.maximum(ax, ay) >= r * 0.65),  # square frame
    )
    return masks[cls]


def make_synthetic(n: int, seed: int) -> Split:
    """n deterministic 32x32 RGB images of 10 classes: a class-specific shape in a class-specific colour, with
    random position, size, colour jitter, background and pixel noise. The first k images are the same for any
    n >= k (one sequential generator), so max_*_samples picks a prefix exactly as it does for CIFAR-10."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 32, 32, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        cls = int(rng.integers(NUM_CLASSES))
        cx, cy = rng.uniform(11, 21, size=2)
        r = rng.uniform(6, 10)
        background = rng.uniform(20, 140, size=3).astype(np.float32)
        colour = np.clip(_PALETTE[cls] + rng.normal(0, 25, size=3), 0, 255).astype(np.float32)
        img = np.broadcast_to(background, (32, 32, 3)).copy()
        img[_shape_mask(cls, cx, cy, r)] = colour
        img += rng.normal(0, 18, size=img.shape).astype(np.float32)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        labels[i] = cls
    return Split(images, labels)


def synthetic_dataset(max_train: int = 0, max_test: int = 0, test_only: bool = False) -> Dataset:
    n_train = 0 if test_only else max_train or SYNTHETIC_SIZES["train"]
    n_test = max_test or SYNTHETIC_SIZES["test"]
    # Fixed seeds, independent of the training seed: the dataset is the same for every run.
    return Dataset(
        "synthetic",
        make_synthetic(min(n_train, SYNTHETIC_SIZES["train"]), 1234),
        make_synthetic(min(n_test, SYNTHETIC_SIZES["test"]), 5678),
        SYNTHETIC_CLASSES,
        "synthetic",
    )
