"""The `main` entry point's work: config -> data -> model -> (LR range test) -> fit, reported through tracking."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cifar_mlflow import augment, data, distributed, engine, gradcam_panel, hardware, lr_finder, plots, stop
from cifar_mlflow.config import LRFindConfig, TrainConfig, scaled_lr
from cifar_mlflow.errors import TrackingError
from cifar_mlflow.jobs.lr_find import log_range_test, range_test
from cifar_mlflow.prepare import TrainingSetup, prepare
from cifar_mlflow.tracking import checkpoints, notes, registry, runs
from cifar_mlflow.tracking.logger import Logger, NullLogger, RunLogger
from cifar_mlflow.tracking.params import as_param, same
from cifar_mlflow.tracking.provenance import versions
from cifar_mlflow.tracking.registry import RegisteredVersion
from cifar_mlflow.tracking.reporter import EpochReporter
from cifar_mlflow.tracking.run_lease import RunLease

SAMPLE_GRID = 32  # augmented training images shown in augmented_samples.png


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    metrics: dict[str, float]
    version: RegisteredVersion | None  # None: registration was not asked for (a sweep's trial)


AfterEpoch = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class Start:
    """What rank 0 decides as the run opens, and every rank follows."""

    done: bool  # the run finished and registered its version already: nothing to train
    resume: dict | None = None  # the checkpoint to resume from
    lr: float | str = "auto"  # the peak LR to train with (lr=auto and lr=scaled resolved)


def run_training(cfg: TrainConfig) -> TrainOutcome | None:
    """One process, or one of torchrun's. Every process runs the same lines (nanoGPT's pattern): rank 0 holds
    the run's lease and a RunLogger (one run, one registered version), the others no lease and a NullLogger;
    what rank 0 decides reaches them through `_decided`, the only place a decision is shared."""
    distributed.check_batch_size(cfg.batch_size)
    ctx = distributed.setup()
    main = ctx is None or ctx.is_main
    try:
        # A run `mlflow run` named is leased to this process before any work: a second process resuming the same
        # run stops here, without touching it.
        with RunLease() if main else contextlib.nullcontext() as held:
            p = prepare(cfg, cfg.max_test_samples, ctx)  # everything that can fail on bad input, before the run opens
            shards = distributed.gather_objects(_epoch1_indices(p.train_loader), ctx.world) if ctx else None
            with runs.open_run(held) if main else contextlib.nullcontext(NullLogger()) as log:
                start = _decided(ctx, lambda: _start(cfg, p, log, shards))
                if start.done:
                    return None
                return _fit_and_register(dataclasses.replace(cfg, lr=start.lr), ctx, p, log, held, start.resume)
    finally:
        distributed.teardown(ctx)


def train_in_run(
    cfg: TrainConfig, p: TrainingSetup, log: RunLogger, held: RunLease, after_epoch: AfterEpoch, register: bool
) -> TrainOutcome | None:
    """One process trains the open run `log` (a sweep's trial): what run_training does in its run, resumed from the
    run's checkpoint if it has one. after_epoch(epoch, metrics) is called after each epoch is handed to the
    reporter; it may stop training (errors.StoppedEarly). register=False: no model is logged or registered.
    None if the run had finished and registered already."""
    start = _start(cfg, p, log, None)
    if start.done:
        return None
    return _fit_and_register(
        dataclasses.replace(cfg, lr=start.lr), None, p, log, held, start.resume, after_epoch, register
    )


def register_from_checkpoint(cfg: TrainConfig, log: RunLogger) -> RegisteredVersion:
    """Register the model of a finished run (open as the active run) from its last checkpoint: a sweep's best
    trial, trained with register=False. The run's test accuracy tags the version, as in run_training."""
    state = checkpoints.load_latest_checkpoint(log)
    if state is None or state["epoch"] < cfg.epochs:
        raise TrackingError(f"run {log.run_id} has no checkpoint of its last epoch ({cfg.epochs}) to register")
    p = prepare(cfg, cfg.max_test_samples)
    _measured_on(log, p)
    p.model.load_state_dict(state["model"])
    data.shutdown_workers(p.train_loader)
    accuracy = float(state["history"][-1]["test/accuracy"])
    return registry.log_and_register_model(
        log,
        p.model,
        p.spec,
        _input_example(p),
        cfg.registered_model_name,
        accuracy,
        cfg.epochs,
        test_size=len(p.dataset.test),
    )


def _measured_on(log: RunLogger, p: TrainingSetup) -> None:
    """The datasets the run's metrics are measured on (shown beside them, and carried to the logged model)."""
    log.measured_on("train/", p.dataset, p.dataset.train)
    log.measured_on("test/", p.dataset, p.dataset.test)


def _input_example(p: TrainingSetup):
    return (
        hardware.to_device_images(torch.from_numpy(p.dataset.test.images[:2]), torch.device("cpu")).contiguous().numpy()
    )


def _decided(ctx: distributed.Context | None, decide: Callable[[], Any]) -> Any:
    """decide() on rank 0, its result on every process (a single process just decides)."""
    if ctx is None:
        return decide()
    return distributed.broadcast_object(decide() if ctx.is_main else None)


def _start(cfg: TrainConfig, p: TrainingSetup, log: Logger, shards: list[list[int]] | None) -> Start:
    """Rank 0, in the open run: log the params (on a resumed run this also refuses parameters that differ from
    the logged ones), find the checkpoint to resume from, and resolve lr=auto."""
    assert isinstance(log, RunLogger), "only rank 0 decides"
    _log_params(
        log, {**cfg.to_params(), **p.derived_params(), **{f"env/{k}_version": v for k, v in versions().items()}}
    )
    _measured_on(log, p)
    resume = checkpoints.load_latest_checkpoint(log)
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
        _log_run_inputs(log, p, shards)
    elif tagged or registered:
        version = tagged or registry.finish_registration(log, cfg.registered_model_name).version
        print(
            f"run {log.run_id} already finished all {resume['epoch']} epochs and registered version {version}; "
            "nothing to resume"
        )
        return Start(done=True)
    else:
        checkpoints.backfill_epochs(log, resume["history"])
        log.set_tags({"resumed_from_epoch": str(resume["epoch"])})
        print(f"resuming run {log.run_id} after epoch {resume['epoch']} of {cfg.epochs}")
    if cfg.lr == "auto":
        lr: float | str = _resolve_auto_lr(cfg, p, log, run.data.params.get("lr/resolved"))
    elif cfg.lr == "scaled":
        lr = scaled_lr(cfg.batch_size)
        log.log_params({"lr/resolved": lr})
        print(f"lr=scaled: peak lr {lr:.4g} for batch {cfg.batch_size} (0.2 at 512, scaled linearly)")
    else:
        lr = cfg.lr
    notes.training_started(log, cfg, p.dataset, lr)
    return Start(done=False, resume=resume, lr=lr)


# A stop asked for after the last epoch waits for the next step: raised at once it could land inside matplotlib's or
# torch.export's weakref callbacks, which swallow it, and the run would go on and register as if never stopped.
@stop.deferred()
def _fit_and_register(
    cfg: TrainConfig,
    ctx: distributed.Context | None,
    p: TrainingSetup,
    log: Logger,
    held: RunLease | None,
    resume: dict | None,
    after_epoch: AfterEpoch | None = None,
    register: bool = True,
) -> TrainOutcome | None:
    main = isinstance(log, RunLogger)
    # epochs whose metrics the run holds (a resume from the other slot trains one of them again): logged once
    reporter = (
        EpochReporter(log, held, checkpoints.logged_through(log) if resume else 0)
        if isinstance(log, RunLogger)
        else None
    )
    try:
        result = engine.fit(
            p.model,
            p.train_loader,
            p.test_loader,
            cfg,
            p.device,
            p.precision,
            on_epoch_end=with_panels(reporter, cfg, p.model, p.dataset, after_epoch) if reporter else None,
            log=print if main else lambda _: None,
            resume=resume,
            ctx=ctx,
        )
        trained_at = time.time()
        data.shutdown_workers(p.train_loader)  # no further training batches: free the cores and memory
        # while the last epoch is still being reported
        tta = engine.evaluate_flip_tta(p.model, p.test_loader, p.device, p.precision, ctx=ctx)
    finally:
        if reporter is not None:
            reporter.close()  # the last finished epoch's checkpoint lands even if training was interrupted
    if not isinstance(log, RunLogger):  # ranks > 0: rank 0 logs and registers
        return None
    last = result.history[-1]
    final = {"test/accuracy_tta": tta}
    if result.first_step_at is not None:  # from process start: imports, data, model, run set-up
        final["perf/seconds_to_first_step"] = result.first_step_at - _process_start()
    log.log_metrics(final, step=cfg.epochs, once=resume is not None)
    log.log_figure(plots.training_curves(result.history), "curves.png")
    log.log_figure(plots.lr_schedule_figure(result.lr_steps, len(p.train_loader)), "lr_schedule.png")

    version = (
        registry.log_and_register_model(
            log,
            p.model,
            p.spec,
            _input_example(p),
            cfg.registered_model_name,
            last["test/accuracy"],
            cfg.epochs,
            test_size=len(p.dataset.test),
        )
        if register
        else None
    )
    notes.training_finished(log, cfg, p.dataset, log.run().data.params.get("lr", cfg.lr), final | last, version)
    # what a user waits for after the last epoch: TTA, figures, model logging and registration
    log.log_metrics({"perf/seconds_after_last_epoch": time.time() - trained_at})
    _print_summary({**last, "test/accuracy_tta": tta}, version, runs.run_url(log))
    return TrainOutcome(log.run_id, last, version)


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


ENV_ON_RESUME = "resumed_env"  # tag prefix: what the environment was when a resume ran in another one


def _log_params(log: RunLogger, params: dict[str, Any]) -> None:
    """The run's params; on a resumed run (an earlier process of ours logged its env/*) the recipe and the data
    must be the same (one line naming what differs), while the environment may have changed: another machine,
    device or library version after a crash is a resume, not another run. Its new values are tagged
    resumed_env/<key> (params cannot change) and printed."""
    logged = log.run().data.params
    env = {k: v for k, v in params.items() if k.startswith("env/")}
    if not any(k.startswith("env/") for k in logged):
        log.log_params(params)
        return
    log.log_params({k: v for k, v in params.items() if k not in env})
    changed = {k: v for k, v in env.items() if k not in logged or not same(logged[k], v)}
    if changed:
        log.set_tags({f"{ENV_ON_RESUME}/{k.removeprefix('env/')}": as_param(v) for k, v in changed.items()})
        was = ", ".join(f"{k} {logged.get(k, '-')} -> {as_param(v)}" for k, v in changed.items())
        print(f"note: resuming in another environment ({was}); tagged {ENV_ON_RESUME}/*")


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def _epoch1_indices(loader) -> list[int]:
    """The training-set indices this process draws in epoch 1 (its shard, in order)."""
    sampler = loader.sampler
    sampler.set_epoch(1)
    return [k - sampler.n for k in sampler]


def _log_run_inputs(log: RunLogger, p: TrainingSetup, shards: list[list[int]] | None = None) -> None:
    """What a fresh run records once: datasets, model summary, augmentations and a sample grid; data-parallel,
    also the processes and the training indices each drew in epoch 1 (disjoint shards, checkable)."""
    if shards is not None and p.ctx is not None:
        log.log_dict(
            {
                "world_size": p.ctx.world,
                "backend": p.ctx.backend,
                "per_process_batch_size": p.train_loader.batch_size,
                "epoch1_indices_by_rank": shards,
            },
            "distributed/shards.json",
        )
    log.log_dataset(p.dataset, p.dataset.train, "training")
    log.log_dataset(p.dataset, p.dataset.test, "evaluation")
    log.log_text(p.summary, "model_summary.txt")
    log.log_text(augment.describe(p.transform), "augmentations.txt")
    log.log_figure(_augmented_grid(p.train_loader, p.dataset.class_names), "augmented_samples.png")


# At least 40 steps: the suggestion fits lines over half a decade, and with fewer points over the sweep's 6
# decades it wanders (on the recorded digits curve, 25 of its 100 points suggest 0.0008-0.008; 33-50, 0.008-0.014).
AUTO_LR_MIN_STEPS, AUTO_LR_MAX_STEPS = 40, 100


def _resolve_auto_lr(cfg: TrainConfig, p: TrainingSetup, log: RunLogger, already: str | None) -> float:
    """lr=auto: range test with the run's optimiser settings and lr_find's sweep bounds, clamped to the
    optimiser's safe range. The sweep takes about one epoch of steps (40 to 100): a few percent of a run on CIFAR-10.
    A resumed run reuses the LR it resolved before (`already`)."""
    if already is not None:
        return float(already)
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LRFindConfig) if hasattr(cfg, f.name)}
    steps = max(AUTO_LR_MIN_STEPS, min(AUTO_LR_MAX_STEPS, len(p.train_loader)))
    sweep = LRFindConfig(**shared, num_iter=steps)
    result = range_test(p, sweep)
    log_range_test(log, result)
    lr = lr_finder.clamp_lr(result.suggested_lr, cfg.optimizer)
    log.log_params({"lr/resolved": lr})
    print(f"lr=auto: range test suggests {result.suggested_lr:.4g}; training with peak lr {lr:.4g}")
    return lr


def _augmented_grid(loader, class_names):
    """The first training batch of epoch 1 exactly as the model will see it (before normalisation)."""
    sampler = loader.sampler
    sampler.set_epoch(1)
    keys = list(iter(sampler))[:SAMPLE_GRID]
    images, labels = loader.dataset.__getitems__(keys)
    return plots.image_grid(
        images.cpu().numpy(), [class_names[i] for i in labels.tolist()], title="augmented training samples"
    )


def _print_summary(final: dict[str, float], version: RegisteredVersion | None, url: str) -> None:
    print(
        "\n".join(
            [
                "",
                "training finished",
                f"  test accuracy {final['test/accuracy']:.4f} (flip TTA {final['test/accuracy_tta']:.4f})"
                f"   test loss {final['test/loss']:.4f}",
                f"  registered {version.model_uri}"
                + ("  (now @champion)" if version.is_champion else "")
                + (f"  (not @champion: {version.withheld})" if version.withheld else "")
                if version
                else "  no model registered (a sweep registers only its best trial)",
                f"  view: {url}",
                "",
            ]
        )
    )
