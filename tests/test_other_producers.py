"""Stores and storages that other versions wrote, read as a user's would be: an MLflow 2.22 sqlite store (runs, a
registered version tagged as this project tags them, its `champion` alias), Optuna 4.9 and 3.1 study storages.
Each fixture was made by the real producer in a throwaway environment (tests/fixtures/*/README.md says how) and is
copied before use: MLflow and Optuna upgrade such files in place."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient

from cifar_mlflow import models
from cifar_mlflow.errors import ConfigError, TrackingError
from cifar_mlflow.sweeps import studies, study_storage
from cifar_mlflow.tracking import registry, runs
from cifar_mlflow.tracking.store import check_tracking_server

FIXTURES = Path(__file__).parent / "fixtures"
MLFLOW2_RUN = "6f4fa51c2f0c4a99afed2a6f6379f30b"  # the run in the MLflow 2.22.5 store
SPEC = models.ModelSpec("resnet18", tuple(f"class{i}" for i in range(10)), (0.5,) * 3, (0.25,) * 3, width=16)


def _copy(name: str, tmp_path: Path) -> Path:
    src = next((FIXTURES / name).glob("*.db"))
    return Path(shutil.copy(src, tmp_path / src.name))


@pytest.fixture
def mlflow2_store(tmp_path, monkeypatch):
    db = _copy("mlflow-2.22.5-store", tmp_path)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    # new runs go to an experiment of this test's (the fixture's experiments name the producer's folders)
    experiment_id = MlflowClient(uri).create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    yield uri
    mlflow.set_tracking_uri(None)


def test_a_store_mlflow_2_wrote_keeps_its_runs_and_champion_when_this_project_registers_into_it(
    mlflow2_store, tmp_path
):
    check_tracking_server()  # MLflow migrated the 2.22 tables in place (39 steps) without a word
    client = MlflowClient()
    old = client.get_run(MLFLOW2_RUN)
    assert (old.info.status, old.data.params["epochs"]) == ("FINISHED", "2")
    assert [(m.step, m.value) for m in client.get_metric_history(MLFLOW2_RUN, "test/accuracy")] == [(1, 0.5), (2, 0.75)]
    assert str(registry.current_champion(client, "cifar10-resnet18").version) == "1"

    torch.manual_seed(0)
    net = models.build_model(SPEC).eval()
    example = np.zeros((2, 3, 32, 32), np.float32)
    results = []
    for accuracy in (0.5, 0.9):
        with runs.open_run() as log:
            results.append(
                registry.log_and_register_model(log, net, SPEC, example, "cifar10-resnet18", accuracy, 2, test_size=300)
            )
    # the version MLflow 2 registered takes part in the champion rule: 0.5 does not beat its 0.75, 0.9 does
    assert [(v.version, v.is_champion) for v in results] == [("2", False), ("3", True)]
    assert str(registry.current_champion(client, "cifar10-resnet18").version) == "3"


def test_a_store_with_an_out_of_date_schema_names_mlflows_upgrade_command(tmp_path, monkeypatch):
    """A store whose tables all exist at an older revision (a server-side database that an older MLflow
    migrated; sqlite files MLflow upgrades by itself): MLflow refuses it, and the line must keep its remedy."""
    db = _copy("mlflow-2.22.5-store", tmp_path)
    uri = f"sqlite:///{db}"
    # upgraded to this MLflow's head by its own CLI (in another process: MLflow caches a store per URI)...
    upgrade = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", uri], capture_output=True, timeout=300)
    assert upgrade.returncode == 0, upgrade.stderr[-2000:]
    with sqlite3.connect(db) as con:  # ...and marked as the 2.22 revision again: all tables, old version
        con.execute("update alembic_version set version_num = '0584bdc529eb'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(TrackingError) as err:
            check_tracking_server()
    finally:
        mlflow.set_tracking_uri(None)
    message = str(err.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI={uri!r} was written by an older MLflow (schema 0584bdc529eb")
    assert message.endswith(f"take a backup of it, then run `mlflow db upgrade {uri}`") and "\n" not in message


def test_an_optuna_4_storage_opens_and_a_study_it_made_is_refused_at_once(tmp_path):
    url = f"sqlite:///{_copy('optuna-4.9.0-storage', tmp_path)}"
    storage = study_storage.open_storage(url)
    legacy = optuna.load_study(study_name="legacy-study", storage=storage)
    assert [t.state.name for t in legacy.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        studies.open_study(
            storage,
            "legacy-study",
            direction="maximize",
            recipe={"metric": "test/accuracy"},
            base={},
            parent_run_id="r",
            pruner=optuna.pruners.NopPruner(),
            seed=0,
            n_trials=4,
        )
    assert time.monotonic() - start < 10, "refused at once, not after the join wait"
    assert str(err.value) == (
        "study='legacy-study' exists in this storage but was not made by a cifar-mlflow sweep (3 trials, no "
        "recipe); choose another study name"
    )
    # a new study beside it works
    study, parent = studies.open_study(
        storage,
        "ours",
        direction="maximize",
        recipe={"metric": "test/accuracy"},
        base={"lr": 0.1},
        parent_run_id="r",
        pruner=optuna.pruners.NopPruner(),
        seed=0,
        n_trials=4,
    )
    assert parent == "r" and len(study.trials) == 1


def test_an_optuna_3_storage_names_optunas_upgrade_command_which_then_works(tmp_path):
    db = _copy("optuna-3.1.1-storage", tmp_path)
    url = f"sqlite:///{db}"
    with pytest.raises(TrackingError) as err:
        study_storage.open_storage(url)
    assert str(err.value) == (
        f"storage={url!r} was made by Optuna 3.1.1, whose tables Optuna {optuna.__version__} no longer reads; take "
        f"a backup of it, then run `optuna storage upgrade --storage {url}`"
    )
    optuna_cli = Path(sys.executable).with_name("optuna")
    done = subprocess.run([str(optuna_cli), "storage", "upgrade", "--storage", url], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    legacy = optuna.load_study(study_name="legacy-study", storage=study_storage.open_storage(url))
    assert legacy.best_trial.value == 0.75 and legacy.user_attrs == {"made_by": "optuna 3.1.1"}
