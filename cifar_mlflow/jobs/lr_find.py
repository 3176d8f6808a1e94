"""The `lr_find` entry point's work (and the `lr=auto` step of training): run the LR range test and log its
curve, its series and the suggested learning rate."""

from __future__ import annotations

from cifar_mlflow import data, lr_finder, optim, plots
from cifar_mlflow.config import LRFindConfig
from cifar_mlflow.prepare import TrainingSetup, prepare
from cifar_mlflow.tracking import runs
from cifar_mlflow.tracking.logger import RunLogger


def range_test(p: TrainingSetup, cfg: LRFindConfig) -> lr_finder.RangeTestResult:
    """Range test on the prepared model with cfg's optimiser; the model comes back exactly as it was."""
    optimizer = optim.build_optimizer(cfg, p.model.parameters(), lr=cfg.start_lr)
    return lr_finder.range_test(
        p.model,
        p.train_loader,
        optimizer,
        p.device,
        p.precision,
        start_lr=cfg.start_lr,
        end_lr=cfg.end_lr,
        num_iter=cfg.num_iter,
        label_smoothing=cfg.label_smoothing,
        l1=cfg.l1,
    )


def log_range_test(log: RunLogger, result: lr_finder.RangeTestResult) -> None:
    """lr_find/curve.png, the series as the table lr_find/curve.json, and the metric lr_find/suggested_lr."""
    log.log_figure(
        plots.lr_finder_figure(result.lrs, result.losses, result.smoothed, result.suggested_lr), "lr_find/curve.png"
    )
    log.log_table({"lr": result.lrs, "loss": result.losses, "smoothed_loss": result.smoothed}, "lr_find/curve.json")
    log.log_metrics({"lr_find/suggested_lr": result.suggested_lr})


def run_lr_find(cfg: LRFindConfig) -> float:
    p = prepare(cfg, max_test=1)
    with runs.open_run() as log:
        log.log_params({**cfg.to_params(), **p.derived_params()})
        log.log_dataset(p.dataset, p.dataset.train, "training")
        result = range_test(p, cfg)
        data.shutdown_workers(p.train_loader)
        log_range_test(log, result)
        ending = "stopped when the loss diverged" if result.diverged else "no divergence within the sweep"
        print(
            f"\nLR range test: {len(result.lrs)} steps from {result.lrs[0]:.3g} to {result.lrs[-1]:.3g} ({ending})"
            f"\n  suggested lr {result.suggested_lr:.4g} (steepest descent of the smoothed loss before its "
            f"minimum)\n"
        )
        return result.suggested_lr
