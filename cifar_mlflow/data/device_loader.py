"""A split resident on the training device as one uint8 tensor, batched by index and augmented with batched
tensor ops (airbench's loader): no worker processes, no per-image Python, no host-to-device copy per batch.

It yields what the worker DataLoader yields (uint8 images (B, 32, 32, 3), int64 labels (B,)), only already on the
device, in the same order: the same EpochSampler draws the (seed, epoch) permutation and the shards, and each
batch's random draws are seeded from (seed, epoch, batch), so a resumed run sees exactly the same images.
Used for the presets that have a batched twin (augment.BATCH_RECIPES); the others keep albumentations workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cifar_mlflow.data.dataset import Split
from cifar_mlflow.data.worker_loader import EpochSampler, mix_seed
from cifar_mlflow.training import augment


class DeviceLoader:
    """Drop-in for loaders.make_loader's DataLoader over one split (this process's shard when world > 1)."""

    def __init__(
        self,
        split: Split,
        *,
        device: torch.device,
        batch_size: int,
        train: bool,
        preset: str = "none",
        mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if preset not in augment.BATCH_RECIPES:
            raise ValueError(
                f"augment={preset!r} has no batched version on the device: expected one of "
                f"{', '.join(augment.BATCH_RECIPES)}"
            )
        self.recipe = augment.BATCH_RECIPES[preset if train else "none"]
        self.device, self.batch_size, self.seed = device, batch_size, seed
        self.sampler = EpochSampler(len(split), seed, shuffle=train, rank=rank, world=world)
        # the same last-batch rule as loaders.make_loader: drop a partial training batch unless it is the only one
        self.drop_last = train and len(self.sampler) > batch_size
        p = self.recipe.pad
        # Padded once for the whole split (reflect-101, as albumentations' PadIfNeeded with BORDER_REFLECT_101):
        # 50,000 CIFAR images are 240 MB at 40x40, a small share of a GPU.
        images = np.pad(split.images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect") if p else split.images
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.fill = torch.tensor(augment.cutout_fill(mean), dtype=torch.uint8, device=device)
        self.generator = torch.Generator(device=device)
        self.dataset = self  # map-style batch access, as the DataLoader's SplitDataset offers

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __getitems__(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch for sampler keys (epoch * n + index), augmented with draws seeded by (seed, first key)."""
        index = torch.as_tensor(np.asarray(keys, dtype=np.int64) % self.sampler.n, device=self.device)
        self.generator.manual_seed(mix_seed(self.seed, keys[0], keys[0] >> 32))
        images = augment.batch_augment(self.images, index, self.recipe, self.fill, self.generator)
        return images, self.labels[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = list(self.sampler)
        for i in range(len(self)):
            yield self.__getitems__(keys[i * self.batch_size : (i + 1) * self.batch_size])
