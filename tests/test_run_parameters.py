"""Parameters as `mlflow run -P` passes them: a registered model name checked before any work, a value that needs
shell quoting (MLflow logs it quoted), what `mlflow run` logged differing from what the entry point received."""

from __future__ import annotations

import subprocess

import pytest
from mlflow import MlflowClient

from cifar_mlflow.errors import ConfigError
from cifar_mlflow.tracking import runs
from tests.conftest import TINY, cli_args, mlflow_run_cmd, one_line


@pytest.fixture(scope="module", autouse=True)
def store(module_store):
    """One store for the module (every test's, so none falls back to ./mlflow.db)."""
    return module_store


@pytest.mark.parametrize("name", ["it's", "a/b"])
def test_registered_model_name_is_checked_before_any_work(name):
    assert one_line(cli_args({**TINY, "dataset": "synthetic", "registered_model_name": name})) == (
        f"registered_model_name={name!r} is not allowed: expected letters, digits, '_', '-' and '.', starting with a letter or digit (at most 256 characters)"
    )


def test_value_that_needs_shell_quoting_works_in_a_fresh_mlflow_run(store, tmp_path):
    """`mlflow run -P "data_dir=/tmp/my data"` used to fail every fresh run: MLflow logs the shell-quoted value
    ("'/tmp/my data'") and the comparison did not unquote it, then told the user to resume."""
    data_dir = tmp_path / "my data"
    params = {
        **TINY,
        "epochs": 1,
        "max_train_samples": 64,
        "dataset": "synthetic",
        "data_dir": data_dir,
        "registered_model_name": "quoted",
    }
    proc = subprocess.run(
        mlflow_run_cmd(params), cwd=store.root, env=store.env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (version,) = MlflowClient(store.uri).search_model_versions("name='quoted'")
    run = MlflowClient(store.uri).get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.params["data_dir"] == f"'{data_dir}'"


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
