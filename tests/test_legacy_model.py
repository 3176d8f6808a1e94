"""Model folders other versions wrote still load: one registered before the tracking package existed (its MLmodel
names the loader module `cifar_mlflow.tracking` by path; tests/fixtures/model-9a1ef61/README.md), the same model
as MLflow 2.22's pyfunc.log_model writes it (no model_id, no input example), and as main registered it until the
`pytorch` flavor (e82b9ac's own code, MLflow 3.17; tests/fixtures/model-e82b9ac/make.py). The last two borrow the
first fixture's weights file rather than committing 45 MB again (their READMEs say how they were made)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from cifar_mlflow import cli
from cifar_mlflow.tracking import serving
from entrypoints.analyze import analyze
from tests.conftest import cli_args

FIXTURE = Path(__file__).parent / "fixtures" / "model-9a1ef61"
MLFLOW2 = Path(__file__).parent / "fixtures" / "model-mlflow-2.22.5"
MAIN_E82B9AC = Path(__file__).parent / "fixtures" / "model-e82b9ac"
WEIGHTS = Path("data") / "model_files" / "weights.safetensors"


@pytest.fixture(params=["model-9a1ef61", "model-mlflow-2.22.5", "model-e82b9ac"])
def folder(request, tmp_path) -> Path:
    """The model folder as its producer wrote it (the other two completed with the shared weights)."""
    if request.param == "model-9a1ef61":
        return FIXTURE / "model"
    source = MLFLOW2 if request.param == "model-mlflow-2.22.5" else MAIN_E82B9AC
    model = Path(shutil.copytree(source / "model", tmp_path / "model"))
    shutil.copy(FIXTURE / "model" / WEIGHTS, model / WEIGHTS)
    return model


def test_their_mlmodels_are_what_their_producers_wrote():
    assert "loader_module: cifar_mlflow.tracking\n" in (FIXTURE / "model" / "MLmodel").read_text()
    mlmodel = (MLFLOW2 / "model" / "MLmodel").read_text()
    assert "mlflow_version: 2.22.5\n" in mlmodel and "model_id" not in mlmodel
    assert not (MLFLOW2 / "model" / WEIGHTS).exists()
    mlmodel = (MAIN_E82B9AC / "model" / "MLmodel").read_text()
    assert "loader_module: cifar_mlflow.tracking.serving\n" in mlmodel and "mlflow_version: 3.17.2\n" in mlmodel
    assert "model_id: m-" in mlmodel and not (MAIN_E82B9AC / "model" / WEIGHTS).exists()


def test_pyfunc_load_model_predicts_what_it_predicted_when_logged(folder):
    model = mlflow.pyfunc.load_model(str(folder))
    proba = model.predict(np.load(FIXTURE / "inputs.npy"))
    np.testing.assert_allclose(proba, np.load(FIXTURE / "expected_proba.npy"), rtol=1e-4, atol=1e-6)


@pytest.fixture
def legacy_version(store, folder) -> str:
    """The fixture's folder registered as version 1 of `legacy` in a fresh store, from a run that trained on the
    synthetic set (as the analysis reads the dataset and batch size from the training run's params)."""
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_params({"dataset": "synthetic", "batch_size": 64})
        mlflow.log_artifacts(str(folder), "model")
    client.create_registered_model("legacy")
    mv = client.create_model_version("legacy", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return f"models:/legacy/{mv.version}"


def test_the_analysis_entry_point_analyzes_it(store, legacy_version):
    model, spec = serving.load_torch_model(legacy_version)
    assert spec.arch == "resnet18" and len(spec.class_names) == 10
    code, message = cli.invoke(
        analyze, cli_args({"model_uri": legacy_version, "max_test_samples": 32, "num_images": 4})
    )
    assert (code, message) == (0, "")
    runs = mlflow.search_runs(filter_string="tags.model_version = '1'", output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert "confusion_matrix.png" in artifacts, artifacts
