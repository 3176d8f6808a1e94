"""`pipeline` entry point: LR range test -> training with the suggested LR -> analysis of the registered
version, as one parent run with the three steps as child runs; finished steps are reused.

    mlflow run . -e pipeline -P epochs=20
    python -m entrypoints.pipeline --epochs 2 --dataset synthetic
"""

import click

from cifar_mlflow.cli import check_store, config_options, heavy_imports, run_cli
from cifar_mlflow.config import PipelineConfig


@click.command(context_settings={"show_default": True, "max_content_width": 110})
@config_options(PipelineConfig)
def pipeline(**params) -> None:
    """Run the lr_find, main and analyze entry points in turn, each as a child run of this one: training uses the
    range test's suggested LR (clamped to the optimiser's safe range), analysis the version training registered.
    A step whose FINISHED run with the same parameters and code version exists is reused, not rerun."""
    config = PipelineConfig(**params)
    check_store()
    with heavy_imports():  # torch, MLflow and the job's own only when work starts
        from cifar_mlflow.jobs.pipeline import run_pipeline

    run_pipeline(config)


if __name__ == "__main__":
    run_cli(pipeline)
