"""`lr_find` entry point: LR range test with main's data, model and optimiser parameters; logs the curve, the
series and `lr_find/suggested_lr`.

    mlflow run . -e lr_find -P num_iter=100
    python -m entrypoints.lr_find --num_iter 100
"""

import click

from cifar_mlflow.cli import check_store, config_options, heavy_imports, run_cli
from cifar_mlflow.config import LRFindConfig


@click.command(context_settings={"show_default": True, "max_content_width": 110})
@config_options(LRFindConfig)
def lr_find(**params) -> None:
    """Sweep the learning rate exponentially, stop when the loss diverges, suggest a peak LR."""
    config = LRFindConfig(**params)
    check_store()
    with heavy_imports():  # torch, MLflow and the job's own only when work starts
        from cifar_mlflow.jobs.lr_find import run_lr_find

    run_lr_find(config)


if __name__ == "__main__":
    run_cli(lr_find)
