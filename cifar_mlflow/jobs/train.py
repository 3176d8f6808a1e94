"""The `main` entry point's work, top to bottom: open the run, decide how it starts (fresh, resumed, or finished
already; the peak LR), fit with each epoch reported, then flip TTA, figures and the registered version.

Every process of a torchrun job runs the same lines (nanoGPT's pattern); `is_main` is decided once: the main
process holds the run's lease and its logger, the others train their shard and log nothing. A sweep's trial runs
`train` in its own child run, with the sweep's per-epoch callback (jobs/sweep.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cifar_mlflow import data, plots
from cifar_mlflow.analysis import gradcam_panel
from cifar_mlflow.config import TrainConfig, scaled_lr
from cifar_mlflow.jobs.lr_find import resolve_auto_lr
from cifar_mlflow.tracking import checkpoint_store, notes, registry, runs
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.tracking.provenance import versions
from cifar_mlflow.tracking.registry import RegisteredVersion
from cifar_mlflow.tracking.reporter import EpochReporter
from cifar_mlflow.tracking.run_lease import RunLease
from cifar_mlflow.training import augment, distributed, engine, hardware, stop
from cifar_mlflow.training.prepare import TrainingSetup, prepare

SAMPLE_GRID = 32  # augmented training images shown in augmented_samples.png


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    metrics: dict[str, float]
    version: RegisteredVersion | None  # None: registration was not asked for (a sweep's trial)


AfterEpoch = Callable[[int, dict[str, float]], None]  # a sweep's pruner: may stop training (errors.StoppedEarly)


@dataclass(frozen=True)
class Start:
    """What the main process decides as the run opens, and every process follows."""

    done: bool  # the run finished and registered its version already: nothing to train
    resume: dict | None = None  # the checkpoint to resume from
    lr: float | str = "auto"  # the peak LR to train with (lr=auto and lr=scaled resolved)


def run_training(cfg: TrainConfig) -> TrainOutcome | None:
    """One process, or one of torchrun's. None if the run had finished and registered already (or on a process
    that is not the main one)."""
    distributed.check_batch_size(cfg.batch_size)
    ctx = distributed.setup()
    is_main = ctx is None or ctx.is_main
    try:
        # A run `mlflow run` named is leased to this process before any work: a second process resuming the same
        # run stops here, without touching it.
        with RunLease() if is_main else contextlib.nullcontext() as lease:
            setup = prepare(cfg, cfg.max_test_samples, ctx)  # everything that can fail on bad input, before the run
            shards = distributed.gather_objects(setup.train_loader.sampler.indices(1), ctx.world) if ctx else None
            with runs.open_run(lease) if is_main else contextlib.nullcontext() as log:
                return train(cfg, setup, log, lease, shards)
    finally:
        distributed.teardown(ctx)


def train(
    cfg: TrainConfig,
    setup: TrainingSetup,
    log: RunLogger | None,
    lease: RunLease | None,
    shards: list[list[int]] | None = None,
    after_epoch: AfterEpoch | None = None,
    register: bool = True,
) -> TrainOutcome | None:
    """Train the open run. log: its logger on the main process, None on torchrun's other ranks. shards: the
    training indices each process draws in epoch 1 (data-parallel). after_epoch(epoch, metrics) runs once each
    epoch is handed to the reporter. register=False (a sweep's trial): no model is logged or registered."""
    ctx = setup.ctx
    is_main = log is not None
    start = _decided(ctx, lambda: _start(cfg, setup, log, shards) if log is not None else None)
    if start.done:
        return None
    cfg = dataclasses.replace(cfg, lr=start.lr)
    # A stop asked for after the last epoch waits for the next step: raised at once it could land inside
    # matplotlib's or torch.export's weakref callbacks, which swallow it, and the run would go on and register as if
    # never stopped.
    with stop.deferred():
        # epochs whose metrics the run holds (a resume from the other slot trains one of them again): logged once
        reporter = (
            EpochReporter(log, lease, checkpoint_store.logged_through(log) if start.resume else 0)
            if log is not None
            else None
        )
        try:
            result = engine.fit(
                setup.model,
                setup.train_loader,
                setup.test_loader,
                cfg,
                setup.device,
                setup.precision,
                on_epoch_end=with_panels(reporter, cfg, setup.model, setup.dataset, after_epoch) if reporter else None,
                log=print if is_main else lambda _: None,
                resume=start.resume,
                ctx=ctx,
                flip_tta=True,
            )
            trained_at = time.time()
            data.shutdown_workers(setup.train_loader)  # no further training batches: free the cores and memory
            # while the last epoch is still being reported
            tta = result.flip_tta
            assert tta is not None  # fit(flip_tta=True) measures it
        finally:
            if reporter is not None:
                reporter.close()  # the last finished epoch's checkpoint lands even if training was interrupted
        if log is None:  # the other ranks: the main process logs and registers
            return None
        last = result.history[-1]
        final = {"test/accuracy_tta": tta}
        if result.first_step_at is not None:  # from process start: imports, data, model, run set-up
            final["perf/seconds_to_first_step"] = result.first_step_at - _process_start()
        log.log_metrics(final, step=cfg.epochs, once=start.resume is not None)
        log.log_figure(plots.training_curves(result.history), "curves.png")
        log.log_figure(plots.lr_schedule_figure(result.lr_steps, len(setup.train_loader)), "lr_schedule.png")
        accuracy = last["test/accuracy"]
        version = register_model(cfg, setup, log, accuracy) if register else None
        notes.training_finished(log, cfg, setup.dataset, log.run().data.params.get("lr", cfg.lr), final | last, version)
        # what a user waits for after the last epoch: TTA, figures, model logging and registration
        log.log_metrics({"perf/seconds_after_last_epoch": time.time() - trained_at})
        notes.print_summary({**last, "test/accuracy_tta": tta}, version, runs.run_url(log))
        return TrainOutcome(log.run_id, last, version)


def register_model(cfg: TrainConfig, setup: TrainingSetup, log: RunLogger, accuracy: float) -> RegisteredVersion:
    """The trained model logged to the run and registered as a version (the champion rule: tracking.registry)."""
    return registry.log_and_register_model(
        log,
        setup.model,
        setup.spec,
        _input_example(setup),
        cfg.registered_model_name,
        accuracy,
        cfg.epochs,
        test_size=len(setup.dataset.test),
    )


def measured_on(log: RunLogger, setup: TrainingSetup) -> None:
    """The datasets the run's metrics are measured on (shown beside them, and carried to the logged model)."""
    log.measured_on("train/", setup.dataset, setup.dataset.train)
    log.measured_on("test/", setup.dataset, setup.dataset.test)


def _input_example(setup: TrainingSetup):
    images = torch.from_numpy(setup.dataset.test.images[:2])
    return hardware.to_device_images(images, torch.device("cpu")).contiguous().numpy()


def _decided(ctx: distributed.Context | None, decide: Callable[[], Any]) -> Any:
    """decide() on the main process, its result on every process (a single process just decides)."""
    if ctx is None:
        return decide()
    return distributed.broadcast_object(decide() if ctx.is_main else None)


def _start(cfg: TrainConfig, setup: TrainingSetup, log: RunLogger, shards: list[list[int]] | None) -> Start:
    """In the open run: log the params (on a resumed run this also refuses parameters that differ from the logged
    ones), find the checkpoint to resume from, and resolve lr=auto and lr=scaled."""
    log.log_run_params(
        {**cfg.to_params(), **setup.derived_params(), **{f"env/{k}_version": v for k, v in versions().items()}}
    )
    measured_on(log, setup)
    resume = checkpoint_store.load_latest_checkpoint(log)
    run = log.run()
    tagged = run.data.tags.get("registered_model_version")
    # Killed after registering but before tagging the run: the version exists, and is the run's result.
    registered = (
        not tagged
        and resume is not None
        and resume["epoch"] >= cfg.epochs
        and registry.version_of_run(log.client, cfg.registered_model_name, log.run_id)
    )
    if resume is None:
        _log_run_inputs(log, setup, shards)
    elif tagged or registered:
        version = tagged or registry.finish_registration(log, cfg.registered_model_name).version
        print(
            f"run {log.run_id} already finished all {resume['epoch']} epochs and registered version {version}; "
            "nothing to resume"
        )
        return Start(done=True)
    else:
        checkpoint_store.backfill_epochs(log, resume["history"])
        log.set_tags({"resumed_from_epoch": str(resume["epoch"])})
        print(f"resuming run {log.run_id} after epoch {resume['epoch']} of {cfg.epochs}")
    if cfg.lr == "auto":
        lr: float | str = resolve_auto_lr(cfg, setup, log, run.data.params.get("lr/resolved"))
    elif cfg.lr == "scaled":
        lr = scaled_lr(cfg.batch_size)
        log.log_params({"lr/resolved": lr})
        print(f"lr=scaled: peak lr {lr:.4g} for batch {cfg.batch_size} (0.2 at 512, scaled linearly)")
    else:
        lr = cfg.lr
    notes.training_started(log, cfg, setup.dataset, lr)
    return Start(done=False, resume=resume, lr=lr)


def with_panels(
    reporter: EpochReporter,
    cfg: TrainConfig,
    model: torch.nn.Module,
    dataset: data.Dataset,
    after_epoch: AfterEpoch | None = None,
) -> Callable[..., None]:
    """on_epoch_end that also hands the reporter a GradCAM panel of fixed test images on the chosen epochs. The
    panel is computed here, on the training thread between epochs (the model must not change meanwhile), and
    rendered and logged by the reporter's thread. after_epoch (a sweep's pruner) runs once the epoch is handed
    to the reporter, so a trial stopped there still gets that epoch's metrics and checkpoint."""
    epochs = set(gradcam_panel.panel_epochs(cfg.log_images_every, cfg.epochs))
    indices = gradcam_panel.panel_indices(dataset.test.labels, len(dataset.class_names))

    def on_epoch_end(epoch: int, metrics: dict[str, float], capture: Callable[[], dict]) -> None:
        images = None
        if epoch in epochs:
            panel = gradcam_panel.compute_panel(model, dataset.test, indices, dataset.class_names, epoch)
            images = {gradcam_panel.PANEL_KEY: panel.figure}
        reporter(epoch, metrics, capture, images)
        if after_epoch is not None:
            after_epoch(epoch, metrics)

    return on_epoch_end


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def _log_run_inputs(log: RunLogger, setup: TrainingSetup, shards: list[list[int]] | None = None) -> None:
    """What a fresh run records once: datasets, model summary, augmentations and a sample grid; data-parallel,
    also the processes and the training indices each drew in epoch 1 (disjoint shards, checkable)."""
    if shards is not None and setup.ctx is not None:
        log.log_dict(
            {
                "world_size": setup.ctx.world,
                "backend": setup.ctx.backend,
                "per_process_batch_size": setup.train_loader.batch_size,
                "epoch1_indices_by_rank": shards,
            },
            "distributed/shards.json",
        )
    log.log_dataset(setup.dataset, setup.dataset.train, "training")
    log.log_dataset(setup.dataset, setup.dataset.test, "evaluation")
    log.log_text(setup.summary, "model_summary.txt")
    log.log_text(augment.describe(setup.transform), "augmentations.txt")
    log.log_figure(_augmented_grid(setup.train_loader, setup.dataset.class_names), "augmented_samples.png")


def _augmented_grid(loader, class_names):
    """The first training batch of epoch 1 exactly as the model will see it (before normalisation)."""
    loader.sampler.set_epoch(1)
    images, labels = loader.dataset.__getitems__(list(loader.sampler)[:SAMPLE_GRID])
    return plots.image_grid(
        images.cpu().numpy(), [class_names[i] for i in labels.tolist()], title="augmented training samples"
    )
