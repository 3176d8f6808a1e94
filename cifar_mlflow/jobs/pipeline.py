"""The `pipeline` entry point's work: LR range test -> training with the suggested LR -> analysis of the version
that training registered, as one parent run whose steps are child runs (MLflow's multistep pattern). A step
whose FINISHED run with the same parameters and code version exists is reused instead of run again."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_mlflow import fields, models
from cifar_mlflow.analysis import gradcam
from cifar_mlflow.config import PipelineConfig
from cifar_mlflow.errors import ConfigError
from cifar_mlflow.tracking import provenance, runs
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.tracking.params import same
from cifar_mlflow.tracking.steps import finished_runs, has_artifacts, model_version_exists, run_entry_point
from cifar_mlflow.training import lr_finder

SUGGESTED = "lr_find/suggested_lr"
VERSION_TAG = "registered_model_version"


@dataclass(frozen=True)
class PipelineOutcome:
    run_id: str
    step_runs: dict[str, str]  # entry point -> run id
    reused: dict[str, bool]
    lr: float
    model_uri: str


def run_pipeline(cfg: PipelineConfig) -> PipelineOutcome:
    # Steps run in the project's folder: a relative data_dir must mean the same folder as for this process.
    absolute = fields.replace(cfg, data_dir=str(Path(cfg.data_dir).resolve()))
    range_test, train, analyze = absolute.steps()  # every step's parameters validated before anything runs
    # the analysis step's layers too, on the network training will build (not after an hour of training)
    blank = models.ModelSpec(
        train.arch, tuple(map(str, range(10))), (0.5,) * 3, (0.25,) * 3, train.norm, width=train.width
    )
    gradcam.resolve_layers(models.build_model(blank), analyze.target_layers)
    project = project_dir()
    with runs.open_run() as parent:
        parent.log_params(cfg.to_params())
        steps: dict[str, Any] = {}
        reused: dict[str, bool] = {}

        def step(entry: str, params: dict[str, Any], needs: Callable[[Any], bool]) -> Any:
            found = finished_step(parent, entry, params, needs) if cfg.reuse else None
            reused[entry] = found is not None
            print(f"pipeline: {entry}: " + (f"reusing finished run {found.info.run_id}" if found else "running"))
            steps[entry] = found or run_entry_point(project, entry, params, parent)
            parent.set_tags(
                {f"step/{entry}/run_id": steps[entry].info.run_id, f"step/{entry}/reused": str(reused[entry]).lower()}
            )
            return steps[entry]

        # A finished step is reused only while what it made is still there: a deleted run is never found, and a
        # run whose artifacts or registered version were removed since is run again.
        found = step(
            "lr_find",
            range_test.to_params(),
            lambda r: SUGGESTED in r.data.metrics and _kept(parent.client, r, LR_FIND_FILES),
        )
        suggested = found.data.metrics[SUGGESTED]
        lr = lr_finder.clamp_lr(suggested, train.optimizer)
        trained = step(
            "main", {**train.to_params(), "lr": lr}, lambda r: _registered(parent.client, r, cfg.registered_model_name)
        )
        model_uri = f"models:/{cfg.registered_model_name}/{trained.data.tags[VERSION_TAG]}"
        analysed = step(
            "analyze",
            {**analyze.to_params(), "model_uri": model_uri},
            lambda r: _kept(parent.client, r, ANALYSIS_FILES),
        )

        summary = {
            SUGGESTED: suggested,
            "lr": lr,
            **{
                k: v
                for k, v in trained.data.metrics.items()
                if k in ("test/accuracy", "test/loss", "test/accuracy_tta")
            },
        }
        parent.log_metrics(summary)
        parent.set_tags({"model_uri": model_uri})
        _print_summary(steps, reused, suggested, lr, model_uri, analysed, runs.run_url(parent))
        return PipelineOutcome(parent.run_id, {k: r.info.run_id for k, r in steps.items()}, reused, lr, model_uri)


LR_FIND_FILES = ("lr_find/curve.json",)
TRAIN_FILES = ("checkpoints/latest.json",)
ANALYSIS_FILES = ("confusion_matrix.png",)


def _kept(client: Any, run: Any, files: tuple[str, ...]) -> bool:
    return has_artifacts(client, run.info.run_id, *files)


def _registered(client: Any, run: Any, name: str) -> bool:
    """A training step is reusable while its version is registered and its model and checkpoints are there."""
    version = run.data.tags.get(VERSION_TAG)
    return version is not None and model_version_exists(client, name, version) and _kept(client, run, TRAIN_FILES)


def project_dir() -> Path:
    """The MLflow Project this package belongs to (the folder holding MLproject)."""
    root = provenance.PACKAGE_DIR.parent
    if not (root / "MLproject").is_file():
        raise ConfigError(
            f"the pipeline runs the MLflow Project's entry points, but {root} holds no MLproject "
            "file; run it from a checkout of cifar-mlflow"
        )
    return root


def finished_step(parent: RunLogger, entry_point: str, params: dict[str, Any], needs: Callable[[Any], bool]) -> Any:
    """The newest FINISHED run of the parent's experiment made by `entry_point` of this project with the same
    code version and the same value for every one of `params`, for which needs(run) holds; else None."""
    for run in finished_runs(parent.client, parent.experiment_id, entry_point):
        logged = run.data.params
        if all(k in logged and same(logged[k], v) for k, v in params.items()) and needs(run):
            return run
    return None


def _print_summary(step_runs, reused, suggested, lr, model_uri, analysed, url) -> None:
    lines = ["", "pipeline finished"]
    for entry, run in step_runs.items():
        lines.append(f"  {entry:8s} run {run.info.run_id}" + ("  (reused)" if reused[entry] else ""))
    acc = analysed.data.metrics.get("test/accuracy")
    lines += [
        f"  lr: range test suggested {suggested:.4g}, trained with {lr:.4g}",
        f"  model {model_uri}" + (f"  test accuracy {acc:.4f}" if acc is not None else ""),
        f"  view: {url}",
        "",
    ]
    print("\n".join(lines))
