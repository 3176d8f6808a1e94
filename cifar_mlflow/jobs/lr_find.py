"""The `lr_find` entry point's work (and the `lr=auto` step of training): run the LR range test and log its
curve, its series and the suggested learning rate."""

from __future__ import annotations

import dataclasses

from cifar_mlflow import data, plots
from cifar_mlflow.config import LRFindConfig, TrainConfig
from cifar_mlflow.tracking import runs
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.training import lr_finder, optim
from cifar_mlflow.training.prepare import TrainingSetup, prepare


def range_test(setup: TrainingSetup, cfg: LRFindConfig) -> lr_finder.RangeTestResult:
    """Range test on the prepared model with cfg's optimiser; the model comes back exactly as it was."""
    optimizer = optim.build_optimizer(cfg, setup.model.parameters(), lr=cfg.start_lr)
    return lr_finder.range_test(
        setup.model,
        setup.train_loader,
        optimizer,
        setup.device,
        setup.precision,
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
    setup = prepare(cfg, max_test=1)
    with runs.open_run() as log:
        log.log_params({**cfg.to_params(), **setup.derived_params()})
        log.log_dataset(setup.dataset, setup.dataset.train, "training")
        result = range_test(setup, cfg)
        data.shutdown_workers(setup.train_loader)
        log_range_test(log, result)
        ending = "stopped when the loss diverged" if result.diverged else "no divergence within the sweep"
        print(
            f"\nLR range test: {len(result.lrs)} steps from {result.lrs[0]:.3g} to {result.lrs[-1]:.3g} ({ending})"
            f"\n  suggested lr {result.suggested_lr:.4g} (steepest descent of the smoothed loss before its "
            f"minimum)\n"
        )
        return result.suggested_lr


# At least 40 steps: the suggestion fits lines over half a decade, and with fewer points over the range test's 6
# decades it wanders (on the recorded digits curve, 25 of its 100 points suggest 0.0008-0.008; 33-50, 0.008-0.014).
AUTO_LR_MIN_STEPS, AUTO_LR_MAX_STEPS = 40, 100


def resolve_auto_lr(cfg: TrainConfig, setup: TrainingSetup, log: RunLogger, already: str | None) -> float:
    """Training's lr=auto: a range test with the run's optimiser settings and lr_find's bounds, its suggestion
    clamped to the optimiser's safe range. It takes about one epoch of steps (40 to 100): a few percent of a run on
    CIFAR-10. A resumed run reuses the LR it resolved before (`already`)."""
    if already is not None:
        return float(already)
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LRFindConfig) if hasattr(cfg, f.name)}
    steps = max(AUTO_LR_MIN_STEPS, min(AUTO_LR_MAX_STEPS, len(setup.train_loader)))
    result = range_test(setup, LRFindConfig(**shared, num_iter=steps))
    log_range_test(log, result)
    lr = lr_finder.clamp_lr(result.suggested_lr, cfg.optimizer)
    log.log_params({"lr/resolved": lr})
    print(f"lr=auto: range test suggests {result.suggested_lr:.4g}; training with peak lr {lr:.4g}")
    return lr
