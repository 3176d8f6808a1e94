"""The worker DataLoader over a split: the epoch sampler (seeded permutation, data-parallel shards), the
batch-at-a-time dataset that augments with albumentations, and worker setup and shutdown.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from cifar_mlflow.data.dataset import Split


def mix_seed(*parts: int) -> int:
    """A deterministic 32-bit seed from several integers."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class EpochSampler:
    """Yields keys `epoch * n + index`: a (seed, epoch)-determined permutation, with the epoch encoded so that the
    dataset can seed augmentation per batch. Augmentation then depends only on (seed, epoch, batch), not on the
    number of workers or on which worker runs a batch, and a resumed run sees exactly the same images.

    Data-parallel (world > 1): every process draws the same permutation and takes every world-th index from
    position `rank`, so the shards never overlap. Training drops the permutation's last n % world indices (as
    torch's DistributedSampler with drop_last=True): every process then runs the same number of steps.
    Evaluation keeps every index (shards may differ by one; evaluation has no collective per batch)."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.rank, self.world = rank, world
        self.used = n - n % world if shuffle else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.used, self.world))

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng(mix_seed(self.seed, self.epoch)).permutation(self.n)
        else:
            order = np.arange(self.n)
        return iter((order[: self.used][self.rank :: self.world] + self.epoch * self.n).tolist())

    def indices(self, epoch: int) -> list[int]:
        """The split indices this process draws in `epoch` (its shard, in order); sets the epoch."""
        self.set_epoch(epoch)
        return [k - epoch * self.n for k in self]


class SplitDataset:
    """Map-style dataset over one split that returns whole batches (`__getitems__`), already collated as
    (uint8 images (B, 32, 32, 3), int64 labels (B,)) tensors; the optional albumentations transform is reseeded
    once per batch from (seed, epoch, first key)."""

    def __init__(self, split: Split, transform: Any = None, seed: int = 0) -> None:
        self.split, self.transform, self.seed = split, transform, seed

    def __len__(self) -> int:
        return len(self.split)

    def _reseed(self, first_key: int) -> None:
        # One distinct seed per transform: albumentations' own set_random_seed gives all children the same one.
        seq = np.random.SeedSequence([self.seed & 0xFFFFFFFF, first_key & 0xFFFFFFFF, first_key >> 32])
        seeds = seq.generate_state(len(self.transform.transforms) + 1)
        self.transform.set_random_seed(int(seeds[0]))
        for t, s in zip(self.transform.transforms, seeds[1:]):
            t.set_random_seed(int(s))

    def __getitems__(self, keys: list[int]) -> tuple[Any, Any]:
        import torch

        idx = np.asarray(keys, dtype=np.int64) % len(self.split)
        images = self.split.images[idx]
        if self.transform is not None:
            self._reseed(int(keys[0]))
            images = np.stack([self.transform(image=img)["image"] for img in images])
        return torch.from_numpy(images), torch.from_numpy(self.split.labels[idx])

    def __getitem__(self, key: int) -> tuple[Any, Any]:
        images, labels = self.__getitems__([key])
        return images[0], labels[0]


def _collated(batch: Any) -> Any:
    """collate_fn for SplitDataset: its batches come back collated already."""
    return batch


def _worker_init(_: int) -> None:
    # Each worker is one process doing tiny images: OpenCV's and torch's own thread pools only add contention.
    import signal

    import cv2
    import torch

    cv2.setNumThreads(0)
    torch.set_num_threads(1)
    # A forked worker inherits the entry point's SIGINT/SIGTERM handlers (cifar_mlflow.training.stop), there to end the
    # MLflow run KILLED; a worker has no run to end: SIGTERM (torch's terminate() at shutdown) just stops it, and
    # Ctrl-C gets Python's KeyboardInterrupt, which torch's worker loop expects.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # A process group of its own: a SIGTERM or Ctrl-C sent to the entry point's whole group (`timeout`, `kill --
    # -PGID`, a container stop, a terminal) reaches the entry point alone, which ends the run KILLED and stops
    # its workers itself. In its group the worker died at once and torch raised "DataLoader worker ... killed by
    # signal" wherever the main process was: a traceback, the run FAILED. A worker whose parent dies without
    # stopping it (SIGKILL) exits by torch's own watchdog within seconds.
    os.setpgid(0, 0)


def shutdown_workers(loader: Any) -> None:
    """Stop a loader's persistent worker processes now, instead of at interpreter exit or garbage collection,
    where torch joins each worker with a 5 s timeout: with many workers that is minutes between the last epoch
    and the run's end. A no-op for loaders without workers."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def auto_num_workers(requested: int, processes: int = 1) -> int:
    """-1 means one worker per spare core (cores minus the one the training loop uses), capped at 8: augmenting
    32x32 images runs at ~10k images/s per core, so a few workers out-pace any device here. With several
    training processes on the machine (data-parallel), each gets its share of the cores."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(processes, 1) - 1))


def make_loader(
    split: Split,
    *,
    batch_size: int,
    train: bool,
    transform: Any = None,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Any:
    """A DataLoader over a split (over this process's shard of it when world > 1; batch_size is then per
    process). Training: shuffled per epoch, augmented, last partial batch dropped when the shard holds more than
    one batch (a batch of 1 would break BatchNorm). Evaluation: in order, every sample of the shard."""
    from torch.utils.data import DataLoader

    sampler = EpochSampler(len(split), seed, shuffle=train, rank=rank, world=world)
    return DataLoader(
        # torch annotates `dataset: Dataset[T]` (nominal), but DataLoader takes any map-style dataset (__len__ and
        # __getitem__/__getitems__, as documented); SplitDataset stays a plain class so this module loads without torch
        SplitDataset(split, transform if train else None, seed),  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(sampler) > batch_size,
        num_workers=num_workers,
        collate_fn=_collated,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init,
        prefetch_factor=4 if num_workers > 0 else None,
    )
