"""The in-memory form of every dataset here: a Split (uint8 images and int64 labels) and a Dataset (both splits,
class names, source).

Images stay uint8 HWC numpy arrays end to end (airbench-style: one array per split); the conversion to float,
CHW/channels_last and normalisation happen on the device, inside the engine and the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_CLASSES = 10  # every dataset here: CIFAR-10, digits and synthetic


@dataclass(frozen=True)
class Split:
    """One split: images (N, 32, 32, 3) uint8 and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> Split:
        """The first n samples (n = 0 means all)."""
        return self if n <= 0 or n >= len(self) else Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    """A named dataset with both splits, its class names and where it came from."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    source: str
