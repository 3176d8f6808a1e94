"""`main` entry point: train a CIFAR-10 classifier, log everything to MLflow, register a model version.

mlflow run . -P epochs=20                  # via the MLproject
python -m entrypoints.train --epochs 2     # directly
"""

import click

from cifar_mlflow.cli import check_store, config_options, heavy_imports, run_cli
from cifar_mlflow.config import TrainConfig


@click.command(context_settings={"show_default": True, "max_content_width": 110})
@config_options(TrainConfig)
def train(**params) -> None:
    """Train ResNet on CIFAR-10 (or the synthetic stand-in), log params, per-epoch metrics, system metrics and
    artifacts to the active MLflow run, and register the model (alias `champion` if it is the best so far)."""
    config = TrainConfig(**params)
    check_store()
    with heavy_imports():  # torch, MLflow and the job's own only when work starts
        from cifar_mlflow.jobs.train import run_training

    run_training(config)


if __name__ == "__main__":
    run_cli(train)
