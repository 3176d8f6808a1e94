"""What the recipe learns on real images, side by side with the loop the course notebooks write.

Both contenders train on the same real data in the CIFAR-10 layout (default: the built-in `digits` set) with the
same epochs, batch size and peak LR, one process per (contender, seed), and report test accuracy per epoch:

- notebook-style loop: a kuangliu-style ResNet18 (PyTorch's default init, no zero-init), albumentations
  reflect-pad 4 + random crop 32, horizontal flip, one 16x16 CoarseDropout filled with 0, Normalize, SGD
  (momentum 0.9, weight decay 5e-4, no Nesterov), OneCycleLR(max_lr=lr) with its defaults, plain cross-entropy,
  fp32;
- project: the `main` entry point's own path (prepare -> engine.fit) with its defaults, MLflow left out.

`--ablation` instead trains the project as it was before the recipe fix (v0: torchvision's He init with
zero-init residual, a CoarseDropout hole kept inside the image) and that recipe with one difference from the
notebook loop changed at a time, to say which difference costs what.

    python -m benchmarks.bench_accuracy [--seeds 0 1 2] [--epochs 6] [--batch-size 64] [--lr 0.05] [--jobs 2]
    python -m benchmarks.bench_accuracy --ablation [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import benchmarks._common as common  # noqa: F401  (sets the environment first)
from benchmarks._common import add_width_option, machine, run_jobs, table


@dataclass(frozen=True)
class Variant:
    """How a project run departs from the project's current defaults (None = keep the project's)."""

    name: str
    init: str | None = None  # "he-zero": torchvision's He init + zero-init residual (v0)
    cutout: str | None = None  # "inside": CoarseDropout kept inside the image (v0); "none"
    fill: str | None = None  # "zero": black holes, as the notebooks fill before Normalize
    schedule: str | None = None  # "torch": OneCycleLR's defaults and SGD without Nesterov
    overrides: tuple[tuple[str, object], ...] = ()  # TrainConfig fields


V0 = dict(init="he-zero", cutout="inside")
ABLATION = [
    Variant("v0 (before the fix)", **V0),
    Variant("v0, zero-init residual off", init="he", cutout="inside"),
    Variant("v0, PyTorch default init (zero-init kept)", init="default-zero", cutout="inside"),
    Variant("v0, PyTorch default init, no zero-init", init="default", cutout="inside"),
    Variant("v0, augment=none", **V0, overrides=(("augment", "none"),)),
    Variant("v0, no cutout", init="he-zero", cutout="none"),
    Variant("v0, cutout centred anywhere (paper)", init="he-zero"),
    Variant("v0, holes filled with 0", **V0, fill="zero"),
    Variant("v0, label_smoothing=0", **V0, overrides=(("label_smoothing", 0.0),)),
    Variant("v0, torch OneCycleLR defaults, no Nesterov", **V0, schedule="torch"),
]


def _reinit(model, init: str) -> None:
    """v0's and the notebooks' initialisations on the project's network."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if init.startswith("he"):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                m.reset_parameters()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.constant_(m.bn2.weight, 0.0 if init.endswith("zero") else 1.0)


def project_run(variant: Variant, seed: int, args: argparse.Namespace) -> list[float]:
    """Test accuracy after each epoch of the project's training path with the variant's departures."""
    import albumentations as A
    import torch

    from cifar_mlflow.config import TrainConfig
    from cifar_mlflow.training import augment, engine, optim
    from cifar_mlflow.training.prepare import prepare

    cfg = TrainConfig(
        **{
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": seed,
            "num_workers": 0,
            "max_train_samples": args.max_train,
            "max_test_samples": args.max_test,
            "width": args.width,
            **dict(variant.overrides),
        }
    )
    setup = prepare(cfg, cfg.max_test_samples)
    if variant.init:
        torch.manual_seed(seed)
        _reinit(setup.model, variant.init)
    if variant.cutout or variant.fill:
        steps = list(setup.train_loader.dataset.transform.transforms) if setup.transform else []
        mean = setup.spec.mean if variant.fill != "zero" else (0.0, 0.0, 0.0)
        keep = [t for t in steps if not isinstance(t, A.CoarseDropout)]
        hole = {
            "inside": A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(16, 16),
                hole_width_range=(16, 16),
                fill=augment.cutout_fill(mean),
                p=1.0,
            ),
            "none": None,
        }.get(variant.cutout or "", augment._cutout(mean))
        setup.train_loader.dataset.transform = A.Compose(keep + ([hole] if hole is not None else []))
    if variant.schedule == "torch":
        optim.build_optimizer = lambda c, params, lr=None: torch.optim.SGD(
            params, lr=c.lr if lr is None else lr, momentum=c.momentum, weight_decay=c.weight_decay
        )
        optim.build_scheduler = lambda c, opt, steps_per_epoch: optim.Schedule(
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, epochs=c.epochs, steps_per_epoch=steps_per_epoch),
            per_step=True,
        )
    result = engine.fit(
        setup.model, setup.train_loader, setup.test_loader, cfg, setup.device, setup.precision, log=lambda s: None
    )
    return [h["test/accuracy"] for h in result.history]


def notebook_run(seed: int, args: argparse.Namespace) -> list[float]:
    """The course-notebook loop (module doc), on the same files."""
    import albumentations as A
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F
    from albumentations.pytorch import ToTensorV2

    from benchmarks.notebook_resnet import ResNet18
    from cifar_mlflow import data

    torch.manual_seed(seed)
    np.random.seed(seed)
    ds = data.load_dataset(args.dataset, args.data_dir, args.max_train, args.max_test)
    mean, std = data.channel_stats(ds.train.images)
    normalise = [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    train_tf = A.Compose(
        [
            A.PadIfNeeded(40, 40, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(32, 32),
            A.HorizontalFlip(p=0.5),
            A.CoarseDropout(
                num_holes_range=(1, 1), hole_height_range=(16, 16), hole_width_range=(16, 16), fill=0, p=1.0
            ),
            *normalise,
        ],
        seed=seed,
    )
    test_tf = A.Compose(normalise)

    class Images(torch.utils.data.Dataset):
        def __init__(self, split, tf):
            self.split, self.tf = split, tf

        def __len__(self):
            return len(self.split)

        def __getitem__(self, i):
            return self.tf(image=self.split.images[i])["image"], int(self.split.labels[i])

    train = torch.utils.data.DataLoader(Images(ds.train, train_tf), batch_size=args.batch_size, shuffle=True)
    test = torch.utils.data.DataLoader(Images(ds.test, test_tf), batch_size=args.batch_size)
    model = ResNet18(len(ds.class_names), width=args.width)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=len(train))
    accuracy = []
    for _ in range(args.epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
        accuracy.append(correct / len(ds.test))
    return accuracy


def _one(job: tuple[str, Variant | None, int, argparse.Namespace]) -> tuple[str, int, list[float], float]:
    name, variant, seed, args = job
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    acc = notebook_run(seed, args) if variant is None else project_run(variant, seed, args)
    return name, seed, acc, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--data-dir", default=None, help="default: a temporary folder (digits is built there)")
    parser.add_argument("--max-train", type=int, default=0, help="first N training images (0 = all)")
    parser.add_argument("--max-test", type=int, default=0, help="first N test images (0 = all)")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--variants", type=int, nargs="+", help="with --ablation: only these rows (0 = v0)")
    parser.add_argument(
        "--jobs", type=int, default=len(os.sched_getaffinity(0)), help="processes at once (1: in this process)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--json", help="also write the per-seed results here")
    add_width_option(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.data_dir = args.data_dir or tmp
        from cifar_mlflow import data

        data.load_dataset(args.dataset, args.data_dir)  # build/download once, before the jobs fork
        contenders: list[tuple[str, Variant | None]] = (
            [(v.name, v) for i, v in enumerate(ABLATION) if args.variants is None or i in args.variants]
            if args.ablation
            else [("notebook-style loop", None), ("project (defaults)", Variant("project"))]
        )
        jobs = [(name, variant, seed, args) for name, variant in contenders for seed in args.seeds]
        done = []
        for result in run_jobs(_one, jobs, args.jobs):
            done.append(result)
            name, seed, acc, secs = result  # progress: runs take minutes each on a CPU
            print(
                f"{name}, seed {seed}: test accuracy by epoch {' '.join(f'{a:.3f}' for a in acc)} ({secs:.0f} s)",
                flush=True,
            )
    results: dict[str, dict[int, list[float]]] = {}
    seconds: dict[str, float] = {}
    for name, seed, acc, secs in done:
        results.setdefault(name, {})[seed] = acc
        seconds[name] = seconds.get(name, 0.0) + secs
    rows = []
    for name, by_seed in results.items():
        finals = [by_seed[s][-1] for s in args.seeds]
        rows.append(
            [
                name,
                statistics.median(finals),
                f"{min(finals):.3f}-{max(finals):.3f}",
                ", ".join(f"{a:.3f}" for a in finals),
                " ".join(f"{statistics.median(e):.2f}" for e in zip(*by_seed.values())),
                seconds[name] / len(args.seeds),
            ]
        )
    print(f"machine: {machine()}")
    print(
        f"{args.dataset}, {args.epochs} epochs, batch {args.batch_size}, peak lr {args.lr}, seeds {args.seeds}, "
        f"{args.jobs} jobs x {args.threads} threads, width {args.width}\n"
    )
    print(table(["contender", "test acc (median)", "spread", "per seed", "median by epoch", "s per run"], rows))
    out = {name: [by_seed[s][-1] for s in args.seeds] for name, by_seed in results.items()}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({name: {str(s): a for s, a in by_seed.items()} for name, by_seed in results.items()}, fh)
    return out


if __name__ == "__main__":
    main()
