"""`analyze` entry point: load a model version, evaluate it, and log misclassified images, GradCAM overlays,
a confusion matrix and per-class accuracy to an analysis run linked to that version.

    mlflow run . -e analyze -P model_uri=models:/cifar10-resnet18/3 -P num_images=20
    python -m entrypoints.analyze --model_uri models:/cifar10-resnet18@champion
"""

import click

from cifar_mlflow.cli import check_store, config_options, heavy_imports, run_cli
from cifar_mlflow.config import AnalyzeConfig


@click.command(context_settings={"show_default": True, "max_content_width": 110})
@config_options(AnalyzeConfig)
def analyze(**params) -> None:
    """Analyse a registered model version on the test split and log the findings as a run of their own."""
    config = AnalyzeConfig(**params)
    check_store()
    with heavy_imports():  # torch, MLflow and the job's own only when work starts
        from cifar_mlflow.jobs.analyze import run_analysis

    run_analysis(config)


if __name__ == "__main__":
    run_cli(analyze)
