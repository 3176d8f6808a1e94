"""`sweep` entry point: an Optuna search over main's recipe, each trial a child run of this one, hopeless trials
pruned between epochs, the best trial's model registered; workers on several machines share one study.

    mlflow run . -e sweep -P n_trials=20 -P epochs=10
    PGPASSWORD=... mlflow run . -e sweep -P study=lr-wd -P storage=postgresql+psycopg2://user@db/optuna  # each worker
    python -m entrypoints.sweep --n_trials 8 --epochs 3 --dataset digits
"""

import click

from cifar_mlflow.cli import check_store, config_options, heavy_imports, run_cli
from cifar_mlflow.sweeps.sweep_config import SweepConfig


@click.command(context_settings={"show_default": True, "max_content_width": 110})
@config_options(SweepConfig)
def sweep(**params) -> None:
    """Search hyperparameters with Optuna: n_trials trials of `main` with parameters drawn from the space, each a
    child run of this run; the parent logs the best parameters, a trials table and Optuna's figures, and the best
    trial's model is registered. Start the same command with the same study on another machine to add a worker;
    start it again after a crash to continue."""
    config = SweepConfig(**params)  # a bad space or value is refused here, before any trial
    check_store()
    with heavy_imports():  # torch, MLflow and the job's own only when work starts
        from cifar_mlflow.jobs.sweep import run_sweep

    run_sweep(config)


if __name__ == "__main__":
    run_cli(sweep)
