"""Target 3 of the speed issue: the same epochs with full MLflow tracking -- sqlite store, params, dataset inputs,
system metrics (every --system-metrics-interval seconds, MLflow's default 10), every epoch's metrics and
checkpoint, the GradCAM panels of training you can watch (--log-images-every, as in a training run: the default
-1 = auto logs one after each of 2 epochs), the curves figure -- against the engine with tracking off.
Target: wall-time ratio <= 1.02. Model registration, a one-off at the end of a run, is timed separately.

    python -m benchmarks.bench_tracking [--images 1024] [--epochs 2] [--repeats 3] [--width 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict

import mlflow
import torch

import benchmarks._common as common  # (sets the environment first)
from benchmarks._common import add_width_option, interleaved, machine, median, table
from cifar_mlflow import data, models, plots
from cifar_mlflow.analysis import gradcam_panel
from cifar_mlflow.config import TrainConfig
from cifar_mlflow.jobs.train import with_panels
from cifar_mlflow.tracking import registry
from cifar_mlflow.tracking.reporter import EpochReporter
from cifar_mlflow.tracking.runs import open_run
from cifar_mlflow.training import engine, hardware


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--system-metrics-interval", type=int, default=10)
    parser.add_argument("--log-images-every", type=int, default=-1)
    parser.add_argument("--store", help="folder for the sqlite store and artifacts (default: a new temp folder)")
    add_width_option(parser)
    args = parser.parse_args(argv)
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = str(args.system_metrics_interval)

    device = hardware.resolve_device()
    precision = hardware.resolve_precision("auto", device)
    split, test = data.make_synthetic(args.images, seed=1), data.make_synthetic(256, seed=2)
    ds = data.Dataset("synthetic", split, test, data.SYNTHETIC_CLASSES, "synthetic")
    mean, std = data.channel_stats(split.images)
    spec = models.ModelSpec("resnet18", data.SYNTHETIC_CLASSES, mean, std, width=args.width)
    cfg = TrainConfig(
        batch_size=args.batch_size, epochs=args.epochs, log_images_every=args.log_images_every, width=args.width
    )
    loader, test_loader, _ = common.standard_loaders(split, test, args.batch_size)
    tmp = os.path.abspath(args.store) if args.store else tempfile.mkdtemp(prefix="bench-tracking-")
    os.chdir(tmp)  # the sqlite store's artifacts go to ./mlruns
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    mlflow.set_experiment("bench")
    registration: list[float] = []
    profile: dict[str, list[float]] = defaultdict(list)

    def fresh():
        torch.manual_seed(0)
        return models.build_model(spec).to(device, memory_format=torch.channels_last)

    def off() -> float:
        model = fresh()
        start = time.perf_counter()
        engine.fit(model, loader, test_loader, cfg, device, precision, log=lambda s: None)
        return time.perf_counter() - start

    def on() -> float:
        model = fresh()
        start = time.perf_counter()
        with open_run() as log:
            log.log_params({**cfg.to_params(), "data/mean": mean, "data/std": std})
            log.log_dataset(ds, split, "training")
            log.log_dataset(ds, test, "evaluation")
            reporter = EpochReporter(log)
            hook = with_panels(reporter, cfg, model, ds)

            def on_epoch_end(*args) -> None:  # timed: the part of tracking that runs on the training thread
                t = time.perf_counter()
                hook(*args)
                profile["training thread, at each epoch's end (state copy, GradCAM panel)"].append(
                    time.perf_counter() - t
                )

            try:
                result = engine.fit(
                    model, loader, test_loader, cfg, device, precision, on_epoch_end=on_epoch_end, log=lambda s: None
                )
                t = time.perf_counter()
            finally:
                reporter.close()
            profile["waiting at the end for the last epoch's report"].append(time.perf_counter() - t)
            profile["reporting thread CPU (checkpoints, metrics, panels)"].append(reporter.cpu_seconds)
            log.log_figure(plots.training_curves(result.history), "curves.png")
            elapsed = time.perf_counter() - start
            if not registration:
                t = time.perf_counter()
                example = (test.images[:2].transpose(0, 3, 1, 2) / 255.0).astype("float32")
                registry.log_and_register_model(
                    log,
                    model,
                    spec,
                    example,
                    "bench",
                    result.history[-1]["test/accuracy"],
                    args.epochs,
                    test_size=len(test),
                )
                registration.append(time.perf_counter() - t)
        return elapsed

    interleaved({"off": off}, 1)  # warm-up
    results = interleaved({"tracking off": off, "full MLflow tracking": on}, args.repeats)
    t_off, t_on = median(results["tracking off"]), median(results["full MLflow tracking"])
    paired = median([a / b for a, b in zip(results["full MLflow tracking"], results["tracking off"])])
    per_epoch = (t_on - t_off) / args.epochs
    rate = args.images * args.epochs / t_off
    print(f"machine: {machine()}")
    print(
        f"{args.epochs} epochs x {args.images} images, batch {args.batch_size}, system metrics every "
        f"{args.system_metrics_interval} s, GradCAM panel after epochs "
        f"{gradcam_panel.panel_epochs(cfg.log_images_every, cfg.epochs)}, median of {args.repeats} interleaved runs\n"
    )
    print(
        table(
            ["contender", "wall s (median)", "runs"],
            [[k, median(v), ", ".join(f"{x:.2f}" for x in v)] for k, v in results.items()],
        )
    )
    full_epoch = 50_000 / rate
    print()
    print(
        table(
            ["measure", "value"],
            [
                ["ratio on/off (target <= 1.02)", f"{t_on / t_off:.3f}"],
                ["median of the rounds' own ratios (each round's drift cancels)", f"{paired:.3f}"],
                ["tracking cost per epoch, s", per_epoch],
                [
                    f"projected ratio for a full CIFAR-10 epoch (50k images, {full_epoch:.0f} s here)",
                    f"{(full_epoch + per_epoch) / full_epoch:.4f}",
                ],
                ["model log + registration (once per run), s", registration[0]],
            ],
        )
    )
    runs = len(results["full MLflow tracking"])
    print(
        f"\nwhere tracking's time goes, seconds per tracked run (mean of {runs}; the reporting thread's CPU is "
        "taken from training where every core trains)"
    )
    print(table(["part", "seconds per run"], [[k, sum(v) / runs] for k, v in profile.items()]))
    return {"ratio": t_on / t_off, "paired_ratio": paired, "per_epoch_s": per_epoch}


if __name__ == "__main__":
    main()
