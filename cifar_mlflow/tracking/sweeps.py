"""A sweep in the tracking store: each trial a child run of the sweep's run, and the place of the sweep's Optuna
study beside a local store."""

from __future__ import annotations

from pathlib import Path

import mlflow

from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.tracking.provenance import CODE_VERSION_TAG, code_version
from cifar_mlflow.tracking.runs import PARENT_TAG


def child_run(parent: RunLogger, name: str, tags: dict[str, str]) -> str:
    """A new run in the parent's experiment, shown nested under it (mlflow.parentRunId); opened by open_run."""
    run = parent.client.create_run(
        parent.experiment_id,
        run_name=name,
        tags={PARENT_TAG: parent.run_id, CODE_VERSION_TAG: code_version(), **tags},
    )
    return run.info.run_id


def beside_store(name: str) -> Path:
    """A file named `name` in the folder of a local sqlite tracking store (the working directory for any other
    store): where a sweep keeps its Optuna study by default."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        return Path(uri[len("sqlite:///") :]).resolve().parent / name
    return Path(name).resolve()
