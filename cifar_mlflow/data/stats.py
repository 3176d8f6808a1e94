"""Numbers that summarise data: per-channel mean/std (normalisation) and content digests of a split (the MLflow
dataset input) or a file (the archive's MD5, checkpoints' SHA-256).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cifar_mlflow.data.dataset import Split


def channel_stats(images: np.ndarray, chunk: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, as fractions of 255 (the scale the model receives)."""
    n = images.shape[0] * images.shape[1] * images.shape[2]
    s = np.zeros(3, np.float64)
    s2 = np.zeros(3, np.float64)
    for i in range(0, len(images), chunk):
        block = images[i : i + chunk].astype(np.float64) / 255.0
        s += block.sum(axis=(0, 1, 2))
        s2 += (block**2).sum(axis=(0, 1, 2))
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
    return tuple(round(float(x), 6) for x in mean), tuple(round(float(x), 6) for x in std)


def array_digest(split: Split) -> str:
    """Short content hash of a split (images and labels), for the MLflow dataset input."""
    h = hashlib.md5()
    h.update(split.images.tobytes())
    h.update(split.labels.tobytes())
    return h.hexdigest()[:12]


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks (the archive is 170 MB, checkpoints ~90 MB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
