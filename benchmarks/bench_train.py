"""Targets 1, 2 and 4 of the speed issue, side by side in one run:

1. training images/s of the project's engine against a loop written the way the course notebooks do it
   (fp32, contiguous tensors, per-sample albumentations + Normalize + ToTensorV2, default DataLoader settings,
   loss.item() and accuracy read every batch for the progress bar): target >= 2.0x;
2. the engine against the limit -- the model's own step rate on tensors already in memory at the same precision
   and memory format: target >= 90%; evaluation against pure inference likewise;
4. the loader + augmentation alone against training: target >= 10x.

    python -m benchmarks.bench_train [--images 512] [--batch-size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import albumentations as A
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2

import benchmarks._common as common  # noqa: F401  (sets the environment first)
from benchmarks._common import add_width_option, interleaved, machine, median, table
from cifar_mlflow import data, models
from cifar_mlflow.config import TrainConfig
from cifar_mlflow.training import augment, engine, hardware, optim, train_step


class NotebookDataset(torch.utils.data.Dataset):
    """One sample at a time, normalised and converted to a float CHW tensor by albumentations."""

    def __init__(self, split: data.Split, transform: A.Compose) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.transform(image=self.split.images[i])["image"], int(self.split.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def notebook_rate(model, loader, optimizer, device) -> float:
    model.train()
    correct = processed = 0
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        correct += out.argmax(dim=1).eq(y).sum().item()
        processed += len(x)
        _ = f"Loss={loss.item():.4f} Accuracy={100 * correct / processed:.2f}"  # the tqdm description
    return processed / (time.perf_counter() - start)


def limit_rate(model, batches, optimizer, device, precision) -> float:
    model.train()
    _sync(device)
    start = time.perf_counter()
    for x, y in batches:
        with hardware.autocast(device, precision):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return sum(len(y) for _, y in batches) / (time.perf_counter() - start)


def inference_rate(model, batches, device, precision) -> float:
    model.eval()
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), hardware.autocast(device, precision):
        for x, _ in batches:
            model(x)
    _sync(device)
    return sum(len(y) for _, y in batches) / (time.perf_counter() - start)


def loader_rate(loader, epoch: int) -> float:
    loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    add_width_option(parser)
    args = parser.parse_args(argv)

    device = hardware.resolve_device()
    precision = hardware.resolve_precision("auto", device)
    split = data.make_synthetic(args.images, seed=1)
    mean, std = data.channel_stats(split.images)
    spec = models.ModelSpec("resnet18", data.SYNTHETIC_CLASSES, mean, std, width=args.width)
    cfg = TrainConfig(batch_size=args.batch_size, epochs=1000)
    torch.manual_seed(0)

    # notebook: normalisation in the transform, so the same network with identity normalisation
    nb_model = models.build_model(
        models.ModelSpec("resnet18", data.SYNTHETIC_CLASSES, (0.0,) * 3, (1.0,) * 3, width=args.width)
    )
    nb_model = nb_model.to(device)
    nb_tf = A.Compose(
        list(augment.build_train_transform("standard", mean).transforms)
        + [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    )
    nb_loader = torch.utils.data.DataLoader(NotebookDataset(split, nb_tf), batch_size=args.batch_size, shuffle=True)
    nb_opt = torch.optim.SGD(nb_model.parameters(), lr=0.01, momentum=0.9)

    model = models.build_model(spec).to(device, memory_format=torch.channels_last)
    workers = data.auto_num_workers(-1)
    loader = data.make_loader(
        split,
        batch_size=args.batch_size,
        train=True,
        transform=augment.build_train_transform("standard", mean),
        seed=0,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    test_loader = data.make_loader(split, batch_size=args.batch_size, train=False, pin_memory=device.type == "cuda")
    optimizer = optim.build_optimizer(cfg, model.parameters())
    schedule = optim.build_scheduler(cfg, optimizer, len(loader))
    step = train_step.TrainStep(model, optimizer, device, precision, label_smoothing=0.1)
    batches = [
        (torch.rand(len(y), 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last), y.to(device))
        for _, y in loader
    ]

    epoch = iter(range(1, 10**6))

    def project() -> float:
        loader.sampler.set_epoch(next(epoch))
        return engine.train_one_epoch(step, loader, schedule).metrics["train/images_per_sec"]

    def project_eval() -> float:
        start = time.perf_counter()
        engine.evaluate(model, test_loader, device, precision)
        return len(split) / (time.perf_counter() - start)

    contenders = {
        "notebook-style loop (fp32, item() per batch)": lambda: notebook_rate(nb_model, nb_loader, nb_opt, device),
        f"project engine ({precision}, channels_last, {workers} workers)": project,
        "limit: model step on in-memory tensors": lambda: limit_rate(model, batches, optimizer, device, precision),
        "project evaluation": project_eval,
        "limit: pure inference": lambda: inference_rate(model, batches, device, precision),
        "loader + augmentation alone": lambda: loader_rate(loader, next(epoch)),
    }
    interleaved(contenders, 1)  # warm-up: workers, allocator, oneDNN/cuDNN kernels
    results = interleaved(contenders, args.repeats)
    med = {name: median(v) for name, v in results.items()}
    names = list(contenders)
    print(f"machine: {machine()}")
    print(f"{args.images} images, batch {args.batch_size}, median of {args.repeats} interleaved runs\n")
    print(
        table(
            ["contender", "images/s (median)", "runs"],
            [[n, med[n], ", ".join(f"{v:.0f}" for v in results[n])] for n in names],
        )
    )
    ratios = {
        "engine / notebook (target >= 2.0)": (med[names[1]] / med[names[0]], 2.0),
        "engine / training limit (target >= 0.9)": (med[names[1]] / med[names[2]], 0.9),
        "evaluation / inference limit (target >= 0.9)": (med[names[3]] / med[names[4]], 0.9),
        "loader / engine training (target >= 10)": (med[names[5]] / med[names[1]], 10.0),
    }
    print()
    print(table(["ratio", "value", "met"], [[k, v, "yes" if v >= t else "NO"] for k, (v, t) in ratios.items()]))
    return {k: v for k, (v, _) in ratios.items()}


if __name__ == "__main__":
    main()
