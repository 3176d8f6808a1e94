"""Parameters as `mlflow run -P` passes them: a registered model name checked before any work, a value that needs
shell quoting (MLflow logs it quoted), what `mlflow run` logged differing from what the entry point received."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifar_mlflow.errors import ConfigError
from cifar_mlflow.tracking import runs
from tests.conftest import TINY, cli_args, one_line


@pytest.fixture(scope="module", autouse=True)
def store(module_store):
    """One store for the module (every test's, so none falls back to ./mlflow.db)."""
    return module_store


@pytest.mark.parametrize("name", ["it's", "a/b"])
def test_registered_model_name_is_checked_before_any_work(name):
    assert one_line(cli_args({**TINY, "dataset": "synthetic", "registered_model_name": name})) == (
        f"registered_model_name={name!r} is not allowed: expected letters, digits, '_', '-' and '.', starting with a letter or digit (at most 256 characters)"
    )


def test_value_that_needs_shell_quoting_works_in_a_fresh_mlflow_run(trained_template):
    """`mlflow run -P "data_dir=/tmp/my data"` used to fail every fresh run: MLflow logs the shell-quoted value
    ("'/tmp/my data'") and the comparison did not unquote it, then told the user to resume. The shared store's
    runs (conftest.trained, read here where it was built) were started that way: training and analysis
    finished, and the training registered."""
    root, facts = trained_template
    data_dir = facts["data_dir"]
    assert " " in Path(data_dir).name
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for run_id in (facts["train_run_id"], facts["analysis_run_id"]):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["data_dir"] == f"'{data_dir}'", run_id
    assert client.get_model_version("cifar10-resnet18", facts["version"]).run_id == facts["train_run_id"]


def test_parameters_mlflow_run_logged_differently_are_not_called_a_resume(store, monkeypatch):
    """If what `mlflow run` logged still differs from what the entry point received, the message does not tell
    the user to resume a run they just started."""

    client = MlflowClient(store.uri)
    run_id = client.create_run(client.get_experiment_by_name(store.experiment).experiment_id).info.run_id
    client.log_param(run_id, "epochs", "3")  # as `mlflow run -P epochs=3` logs it
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    with pytest.raises(ConfigError) as err, runs.open_run() as log:
        log.log_params({"epochs": 4, "data_dir": "/tmp/my data"})
    assert str(err.value) == (
        f"run {run_id}: `mlflow run` logged parameters that differ from those this process "
        "received: epochs (run: '3', now: 4)"
    )
