"""Target 7 of the speed issue: 20 epochs on 50,000 synthetic images on one GPU with torch.compile, bf16 autocast,
channels_last and cuDNN benchmark (target <= 60 s on one H100), timed through the project's own loader and engine
(augmentation and a test pass every epoch included, MLflow not). Runs on CPU too, scaled down unless told
otherwise, so that it stays tested.

    python -m benchmarks.bench_cuda                       # GPU: 50,000 images x 20 epochs, compiled
    python -m benchmarks.bench_cuda --images 256 --epochs 1 --no-compile   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

import benchmarks._common as common  # (sets the environment first)
from benchmarks._common import machine, table
from cifar_mlflow import data, models
from cifar_mlflow.config import TrainConfig
from cifar_mlflow.training import engine, hardware


def main(argv: list[str] | None = None) -> dict[str, float]:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000 if cuda else 256)
    parser.add_argument("--test-images", type=int, default=10_000 if cuda else 64)
    parser.add_argument("--epochs", type=int, default=20 if cuda else 1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda)
    args = parser.parse_args(argv)

    device = hardware.resolve_device()
    precision = hardware.resolve_precision("auto", device)
    start = time.perf_counter()
    split, test = data.make_synthetic(args.images, seed=1), data.make_synthetic(args.test_images, seed=2)
    data_s = time.perf_counter() - start
    mean, std = data.channel_stats(split.images)
    torch.manual_seed(0)
    model = models.build_model(models.ModelSpec("resnet18", data.SYNTHETIC_CLASSES, mean, std))
    model = model.to(device, memory_format=torch.channels_last)
    if cuda:
        torch.backends.cudnn.benchmark = True
    loader, test_loader, workers = common.standard_loaders(split, test, args.batch_size, pin_memory=cuda)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, compile=args.compile)
    epoch_ends: list[float] = []
    start = time.perf_counter()
    result = engine.fit(
        model,
        loader,
        test_loader,
        cfg,
        device,
        precision,
        log=lambda s: None,
        on_epoch_end=lambda e, m, capture: epoch_ends.append(time.perf_counter()),
    )
    total = time.perf_counter() - start
    first_epoch = epoch_ends[0] - start
    steady = (epoch_ends[-1] - epoch_ends[0]) / max(len(epoch_ends) - 1, 1) if len(epoch_ends) > 1 else first_epoch
    print(f"machine: {machine()}")
    print(
        f"{args.epochs} epochs x {args.images} images (+{args.test_images} test images per epoch), batch "
        f"{args.batch_size}, {precision}, channels_last, compile={args.compile}, {workers} loader workers\n"
    )
    print(
        table(
            ["measure", "value"],
            [
                ["total training time, s" + (" (target <= 60 on one H100)" if cuda else ""), total],
                ["first epoch (compilation included), s", first_epoch],
                ["later epochs, s each", steady],
                ["training images/s, last epoch", result.history[-1]["train/images_per_sec"]],
                ["final test accuracy", result.history[-1]["test/accuracy"]],
                ["generating the synthetic data, s (not in the total)", data_s],
            ],
        )
    )
    return {"total_s": total, "final_accuracy": result.history[-1]["test/accuracy"]}


if __name__ == "__main__":
    main()
