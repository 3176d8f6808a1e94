"""What training and the LR range test both need, built from their configs: device, precision, data,
normalisation statistics, the model and the loaders. Everything here can fail on bad input, so it all happens
before an MLflow run is opened."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cifar_mlflow import data, models
from cifar_mlflow.training import augment, distributed, engine, hardware


@dataclass
class TrainingSetup:
    device: torch.device
    precision: str
    dataset: data.Dataset
    spec: models.ModelSpec
    model: torch.nn.Module  # on the device, channels_last
    summary: str  # torchinfo table
    transform: Any  # albumentations pipeline or None
    num_workers: int
    train_loader: Any
    test_loader: Any
    ctx: distributed.Context | None = None
    loader: str = "workers"  # how training batches are made: device or workers

    def derived_params(self) -> dict[str, Any]:
        """Values worth logging beside the config: they follow from it and from the machine."""
        world = (
            {
                "env/world_size": self.ctx.world,
                "env/backend": self.ctx.backend,
                "env/per_process_batch_size": self.train_loader.batch_size,
            }
            if self.ctx
            else {}
        )
        return {
            **world,
            "model/num_params": models.num_parameters(self.model),
            "data/train_size": len(self.dataset.train),
            "data/test_size": len(self.dataset.test),
            "data/mean": self.spec.mean,
            "data/std": self.spec.std,
            "env/device": _device_name(self.device),
            "env/precision": self.precision,
            "env/num_workers": self.num_workers,
            "env/loader": self.loader,
            **({"env/precision_emulated": True} if hardware.precision_is_emulated(self.precision, self.device) else {}),
        }


def prepare(cfg: Any, max_test: int, ctx: distributed.Context | None = None) -> TrainingSetup:
    """cfg: a TrainConfig or LRFindConfig (the fields they share). ctx (torchrun): this process's shards of
    both splits, batch_size / world images per step, and this process's GPU."""
    device = hardware.resolve_device(ctx)
    precision = hardware.resolve_precision(cfg.precision, device)
    if hardware.precision_is_emulated(precision, device):
        print(
            f"warning: precision={precision} on this CPU is emulated (no AVX512-BF16/AMX): expect training 10x "
            "or more slower than precision=fp32 (precision=auto picks fp32 here)",
            flush=True,
        )
    dataset = data.load_dataset(cfg.dataset, cfg.data_dir, cfg.max_train_samples, max_test)
    if len(dataset.train) < 2 or len(dataset.test) < 1:
        raise data.DataError(
            f"{dataset.source}: need at least 2 training and 1 test image, "
            f"got {len(dataset.train)} and {len(dataset.test)}"
        )
    mean, std = data.channel_stats(dataset.train.images)
    engine.seed_everything(cfg.seed)
    spec = models.ModelSpec(cfg.arch, dataset.class_names, mean, std, cfg.norm, width=cfg.width)
    model = models.build_model(spec)
    summary = _model_summary(model)
    model = model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes: let cuDNN pick the fastest kernels once
    transform = augment.build_train_transform(cfg.augment, mean)
    rank, world = (ctx.rank, ctx.world) if ctx else (0, 1)
    shard = {"batch_size": cfg.batch_size // world, "rank": rank, "world": world}  # this process's part
    loader = resolve_loader(cfg.loader, cfg.augment, device)
    if loader == "device":
        from cifar_mlflow.data.device_loader import DeviceLoader

        workers = 0
        train_loader: Any = DeviceLoader(
            dataset.train, device=device, train=True, preset=cfg.augment, mean=mean, seed=cfg.seed, **shard
        )
        test_loader: Any = DeviceLoader(dataset.test, device=device, train=False, **shard)
    else:
        workers = data.auto_num_workers(cfg.num_workers, processes=world)
        pin = device.type == "cuda"
        train_loader = data.make_loader(
            dataset.train, train=True, transform=transform, seed=cfg.seed, num_workers=workers, pin_memory=pin, **shard
        )
        # Test batches are array slices (no per-sample work): a worker process would only add IPC latency.
        test_loader = data.make_loader(dataset.test, train=False, pin_memory=pin, **shard)
    return TrainingSetup(
        device, precision, dataset, spec, model, summary, transform, workers, train_loader, test_loader, ctx, loader
    )


def resolve_loader(loader: str, preset: str, device: torch.device) -> str:
    """`auto` -> device on a GPU for the presets with a batched version, else workers. On a CPU the worker
    processes augment in parallel with the training threads, which the batched ops on the same cores cannot."""
    if loader != "auto":
        return loader
    return "device" if device.type == "cuda" and preset in augment.BATCH_RECIPES else "workers"


def _model_summary(model: torch.nn.Module) -> str:
    from torchinfo import summary

    return str(
        summary(model, input_size=(1, 3, 32, 32), device="cpu", verbose=0, col_names=("output_size", "num_params"))
    )


def _device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
