"""The `main` entry point's work: config -> data -> model -> (LR range test) -> fit, reported through tracking."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cifar_mlflow import augment, data, distributed, engine, lr_finder, plots, tracking, watch
from cifar_mlflow.config import LRFindConfig, TrainConfig
from cifar_mlflow.lr_finder_job import log_range_test, range_test
from cifar_mlflow.prepare import prepare

SAMPLE_GRID = 32  # augmented training images shown in augmented_samples.png


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    metrics: dict[str, float]
    version: tracking.RegisteredVersion


def run_training(cfg: TrainConfig) -> TrainOutcome | None:
    """One process, or one of torchrun's: rank 0 does all the MLflow work (one run, one registered version),
    the other ranks train their shards and follow rank 0's decisions (resume state, learning rate)."""
    distributed.check_batch_size(cfg.batch_size)
    ctx = distributed.setup()
    try:
        if ctx is not None and not ctx.is_main:
            return _follow(cfg, ctx)
        return _lead(cfg, ctx)
    finally:
        distributed.teardown(ctx)


def _share(ctx: distributed.Context | None, value: Any = None) -> Any:
    """Rank 0's value on every process (a no-op for a single process)."""
    return distributed.broadcast_object(value) if ctx is not None else value


def _follow(cfg: TrainConfig, ctx: distributed.Context) -> None:
    """A rank > 0: the same collectives as _lead, in the same order, and no MLflow."""
    p = prepare(cfg, cfg.max_test_samples, ctx)
    distributed.gather_objects(_epoch1_indices(p.train_loader), ctx.world)
    start = _share(ctx)
    if start["done"]:
        return None
    cfg = dataclasses.replace(cfg, lr=_share(ctx))
    engine.fit(
        p.model,
        p.train_loader,
        p.test_loader,
        cfg,
        p.device,
        p.precision,
        log=lambda _: None,
        resume=start["resume"],
        ctx=ctx,
    )
    data.shutdown_workers(p.train_loader)
    engine.evaluate_flip_tta(p.model, p.test_loader, p.device, p.precision, ctx=ctx)
    return None


def _lead(cfg: TrainConfig, ctx: distributed.Context | None) -> TrainOutcome | None:
    tracking.check_tracking_server()  # seconds, not a wasted run, if the server is down
    # A run `mlflow run` named is leased to this process before any work: a second process resuming the same
    # run stops here, without touching it.
    with tracking.RunLease() as held:
        p = prepare(cfg, cfg.max_test_samples, ctx)  # everything that can fail on bad input, before the run opens
        shards = distributed.gather_objects(_epoch1_indices(p.train_loader), ctx.world) if ctx else None
        with tracking.open_run(held) as run:
            return _train_in_run(cfg, ctx, p, shards, run, held)


def _train_in_run(
    cfg: TrainConfig, ctx: distributed.Context | None, p, shards, run, held: tracking.RunLease
) -> TrainOutcome | None:
    run_id = run.info.run_id
    # On a resumed run (mlflow run --run-id) this also refuses parameters that differ from the logged ones.
    tracking.log_params(
        {**cfg.to_params(), **p.derived_params(), **{f"env/{k}_version": v for k, v in tracking.versions().items()}}
    )
    resume = tracking.load_latest_checkpoint(run_id)
    tagged = run.data.tags.get("registered_model_version")
    # Killed after registering but before tagging the run: the version exists, and is the run's result.
    registered = (
        not tagged
        and resume is not None
        and resume["epoch"] >= cfg.epochs
        and tracking.version_of_run(cfg.registered_model_name, run_id)
    )
    if resume is None:
        _log_run_inputs(p, shards)
    elif tagged or registered:
        version = tagged or tracking.finish_registration(cfg.registered_model_name, run_id).version
        print(
            f"run {run_id} already finished all {resume['epoch']} epochs and registered version {version}; "
            "nothing to resume"
        )
        _share(ctx, {"done": True})
        return None
    else:
        tracking.backfill_epochs(run_id, resume["history"])
        tracking.set_tags({"resumed_from_epoch": str(resume["epoch"])})
        print(f"resuming run {run_id} after epoch {resume['epoch']} of {cfg.epochs}")
    _share(ctx, {"done": False, "resume": resume})
    if cfg.lr == "auto":
        cfg = _resolve_auto_lr(cfg, p, run.data.params.get("lr/resolved"))
    _share(ctx, cfg.lr)
    return _fit_and_register(cfg, ctx, p, run, held, resume)


def _fit_and_register(
    cfg: TrainConfig, ctx: distributed.Context | None, p, run, held: tracking.RunLease, resume: dict | None
) -> TrainOutcome:
    run_id = run.info.run_id
    # epochs whose metrics the run holds (a resume from the other slot trains one of them again): logged once
    reporter = tracking.EpochReporter(run_id, held, tracking.logged_through(run_id) if resume else 0)
    try:
        result = engine.fit(
            p.model,
            p.train_loader,
            p.test_loader,
            cfg,
            p.device,
            p.precision,
            on_epoch_end=with_panels(reporter, cfg, p.model, p.dataset),
            resume=resume,
            ctx=ctx,
        )
        trained_at = time.time()
        data.shutdown_workers(p.train_loader)  # no further training batches: free the cores and memory
        # while the last epoch is still being reported
        tta = engine.evaluate_flip_tta(p.model, p.test_loader, p.device, p.precision, ctx=ctx)
    finally:
        reporter.close()  # the last finished epoch's checkpoint lands even if training was interrupted
    final = {"test/accuracy_tta": tta}
    if result.first_step_at is not None:  # from process start: imports, data, model, run set-up
        final["perf/seconds_to_first_step"] = result.first_step_at - _process_start()
    tracking.log_epoch(cfg.epochs, final, once=resume is not None)
    tracking.log_figure(plots.training_curves(result.history), "curves.png")
    tracking.log_figure(plots.lr_schedule_figure(result.lr_steps, len(p.train_loader)), "lr_schedule.png")

    example = p.dataset.test.images[:2].transpose(0, 3, 1, 2).astype("float32") / 255.0
    version = tracking.log_and_register_model(
        p.model, p.spec, example, cfg.registered_model_name, result.final["test/accuracy"], cfg.epochs
    )
    # what a user waits for after the last epoch: TTA, figures, model logging and registration
    tracking.log_metrics({"perf/seconds_after_last_epoch": time.time() - trained_at})
    _print_summary({**result.final, "test/accuracy_tta": tta}, version, tracking.run_url(run))
    return TrainOutcome(run_id, result.final, version)


def with_panels(
    reporter: tracking.EpochReporter, cfg: TrainConfig, model: torch.nn.Module, dataset: data.Dataset
) -> Callable[..., None]:
    """on_epoch_end that also hands the reporter a GradCAM panel of fixed test images on the chosen epochs. The
    panel is computed here, on the training thread between epochs (the model must not change meanwhile), and
    rendered and logged by the reporter's thread."""
    epochs = set(watch.panel_epochs(cfg.log_images_every, cfg.epochs))
    indices = watch.panel_indices(dataset.test.labels, len(dataset.class_names))

    def on_epoch_end(epoch: int, metrics: dict[str, float], capture: Callable[[], dict]) -> None:
        images = None
        if epoch in epochs:
            panel = watch.compute_panel(model, dataset.test, indices, dataset.class_names, epoch)
            images = {watch.PANEL_KEY: panel.figure}
        reporter(epoch, metrics, capture, images)

    return on_epoch_end


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def _epoch1_indices(loader) -> list[int]:
    """The training-set indices this process draws in epoch 1 (its shard, in order)."""
    sampler = loader.sampler
    sampler.set_epoch(1)
    return [k - sampler.n for k in sampler]


def _log_run_inputs(p, shards: list[list[int]] | None = None) -> None:
    """What a fresh run records once: datasets, model summary, augmentations and a sample grid; data-parallel,
    also the processes and the training indices each drew in epoch 1 (disjoint shards, checkable)."""
    if shards is not None:
        tracking.log_dict(
            {
                "world_size": p.ctx.world,
                "backend": p.ctx.backend,
                "per_process_batch_size": p.train_loader.batch_size,
                "epoch1_indices_by_rank": shards,
            },
            "distributed/shards.json",
        )
    tracking.log_dataset(p.dataset, p.dataset.train, "training")
    tracking.log_dataset(p.dataset, p.dataset.test, "evaluation")
    tracking.log_text(p.summary, "model_summary.txt")
    tracking.log_text(augment.describe(p.transform), "augmentations.txt")
    tracking.log_figure(_augmented_grid(p.train_loader, p.dataset.class_names), "augmented_samples.png")


# At least 40 steps: the suggestion fits lines over half a decade, and with fewer points over the sweep's 6
# decades it wanders (on the recorded digits curve, 25 of its 100 points suggest 0.0008-0.008; 33-50, 0.008-0.014).
AUTO_LR_MIN_STEPS, AUTO_LR_MAX_STEPS = 40, 100


def _resolve_auto_lr(cfg: TrainConfig, p, already: str | None) -> TrainConfig:
    """lr=auto: range test with the run's optimiser settings and lr_find's sweep bounds, clamped to the
    optimiser's safe range. The sweep takes about one epoch of steps (40 to 100): a few percent of a run on CIFAR-10.
    A resumed run reuses the LR it resolved before (`already`)."""
    if already is not None:
        return dataclasses.replace(cfg, lr=float(already))
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LRFindConfig) if hasattr(cfg, f.name)}
    steps = max(AUTO_LR_MIN_STEPS, min(AUTO_LR_MAX_STEPS, len(p.train_loader)))
    sweep = LRFindConfig(**shared, num_iter=steps)
    result = range_test(p, sweep)
    log_range_test(result)
    lr = lr_finder.clamp_lr(result.suggested_lr, cfg.optimizer)
    tracking.log_params({"lr/resolved": lr})
    print(f"lr=auto: range test suggests {result.suggested_lr:.4g}; training with peak lr {lr:.4g}")
    return dataclasses.replace(cfg, lr=lr)


def _augmented_grid(loader, class_names):
    """The first training batch of epoch 1 exactly as the model will see it (before normalisation)."""
    sampler = loader.sampler
    sampler.set_epoch(1)
    keys = list(iter(sampler))[:SAMPLE_GRID]
    images, labels = loader.dataset.__getitems__(keys)
    return plots.image_grid(
        images.cpu().numpy(), [class_names[i] for i in labels.tolist()], title="augmented training samples"
    )


def _print_summary(final: dict[str, float], version: tracking.RegisteredVersion, url: str) -> None:
    print(
        "\n".join(
            [
                "",
                "training finished",
                f"  test accuracy {final['test/accuracy']:.4f} (flip TTA {final['test/accuracy_tta']:.4f})"
                f"   test loss {final['test/loss']:.4f}",
                f"  registered {version.model_uri}" + ("  (now @champion)" if version.is_champion else ""),
                f"  view: {url}",
                "",
            ]
        )
    )
