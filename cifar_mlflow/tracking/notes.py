"""Run descriptions: the Markdown the MLflow UI shows as a run's description (the `mlflow.note.content` tag),
written when a run starts (what it does) and rewritten when it ends (what it found)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from cifar_mlflow.values import WIDTH

if TYPE_CHECKING:
    from cifar_mlflow import data
    from cifar_mlflow.config import TrainConfig
    from cifar_mlflow.tracking.logger import RunLogger
    from cifar_mlflow.tracking.registry import RegisteredVersion

ARCHS = {"resnet18": "ResNet18", "resnet34": "ResNet34"}


def _recipe(cfg: TrainConfig, dataset: data.Dataset, peak_lr: float | str, asked: float | str) -> str:
    """asked: the lr parameter as given (auto, scaled or a number); peak_lr: what it resolved to."""
    peak = f"{peak_lr:.4g}" if isinstance(peak_lr, float) else str(peak_lr)
    how = f" (lr={asked})" if isinstance(asked, str) and asked != peak else ""
    return (
        f"**{ARCHS.get(cfg.arch, cfg.arch)}**{'' if cfg.width == WIDTH else f' at width {cfg.width}'} ({cfg.norm} norm) "
        f"on **{dataset.name}** "
        f"({len(dataset.train):,} training / {len(dataset.test):,} test images): {cfg.epochs} epochs at batch "
        f"{cfg.batch_size}, {cfg.optimizer} with {cfg.scheduler} schedule, peak lr {peak}{how}, "
        f"augment={cfg.augment}, seed {cfg.seed}."
    )


def training_started(log: RunLogger, cfg: TrainConfig, dataset: data.Dataset, peak_lr: float | str) -> None:
    """cfg: as given (its lr may be auto or scaled)."""
    log.set_tags({MLFLOW_RUN_NOTE: _recipe(cfg, dataset, peak_lr, cfg.lr) + "\n\nTraining; no result yet."})


def training_finished(
    log: RunLogger,
    cfg: TrainConfig,
    dataset: data.Dataset,
    asked: float | str,
    final: dict[str, float],
    version: RegisteredVersion | None,
) -> None:
    """cfg: as trained (lr resolved to a number); asked: the lr parameter as given."""
    result = (
        f"Test accuracy **{final['test/accuracy']:.4f}** (flip TTA {final['test/accuracy_tta']:.4f}), "
        f"test loss {final['test/loss']:.4f}, after epoch {cfg.epochs}."
    )
    if version is None:
        registered = "No model registered (a sweep registers only its best trial)."
    else:
        registered = f"Registered as `{version.model_uri}`" + (
            ", now @champion." if version.is_champion else f"; not @champion ({version.withheld or 'not the best'})."
        )
    log.set_tags({MLFLOW_RUN_NOTE: f"{_recipe(cfg, dataset, cfg.lr, asked)}\n\n{result} {registered}"})


def analysis_finished(log: RunLogger, ref: Any, dataset_name: str, accuracy: float, wrong: int, total: int) -> None:
    what = f"version {ref.version} of `{ref.name}`" if ref.name else f"`{ref.uri}`"
    trained = f", trained in run `{ref.run_id}`" if ref.run_id else ""
    log.set_tags(
        {
            MLFLOW_RUN_NOTE: (
                f"Analysis of {what} (`{ref.uri}`{trained}) on **{dataset_name}** ({total:,} test images): test "
                f"accuracy **{accuracy:.4f}**, {wrong:,} misclassified. Artifacts: confusion matrix, per-class "
                "accuracy, the most-confused pairs, misclassified images and their GradCAM overlays."
            )
        }
    )


def print_summary(final: dict[str, float], version: RegisteredVersion | None, url: str) -> None:
    """The console's last words of a training run: its test accuracy, the version registered, its URL."""
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
