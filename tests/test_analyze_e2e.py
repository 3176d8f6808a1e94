"""The analyze entry point end to end, against the real registry of the shared store (conftest.trained: a tiny
model trained through `mlflow run`, then analysed by alias through `mlflow run -e analyze`): that analysis, one by
version (directly), one of a run's model; then the error cases."""

import json
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient

from entrypoints.analyze import analyze
from tests.conftest import REPO, TRAINED_ANALYSIS, mlflow_run, one_line

PNG = b"\x89PNG\r\n\x1a\n"


def _run_of(store, run_id):
    return MlflowClient(store.uri).get_run(run_id)


def _analysis_runs(store, training_run_id):
    client = MlflowClient(store.uri)
    exp = client.get_experiment_by_name(store.experiment).experiment_id
    return client.search_runs([exp], f"tags.training_run_id = '{training_run_id}'", order_by=["start_time ASC"])


def test_analyze_champion_through_mlflow_run(trained):
    store, client = trained.store, MlflowClient(trained.store.uri)
    train_run, run = client.get_run(trained.train_run_id), client.get_run(trained.analysis_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.entryPoint"] == "analyze"
    assert run.data.params["num_images"] == str(TRAINED_ANALYSIS["num_images"])

    # lineage both ways
    assert run.data.tags["model_name"] == "cifar10-resnet18" and run.data.tags["model_version"] == "1"
    assert run.data.tags["training_run_id"] == train_run.info.run_id
    assert client.get_model_version("cifar10-resnet18", "1").tags["analysis_run_id"] == run.info.run_id

    # the same accuracy as the training run's last epoch on the same data, and per-class metrics
    metrics = run.data.metrics
    assert metrics["test/accuracy"] == train_run.data.metrics["test/accuracy"]
    assert metrics["test/loss"] == pytest.approx(train_run.data.metrics["test/loss"], rel=1e-6)
    for name in ("red-disc", "lime-frame"):
        for stat in ("accuracy", "precision", "recall"):
            assert 0 <= metrics[f"test/{stat}/{name}"] <= 1

    # artifacts
    local = client.download_artifacts(run.info.run_id, "", str(store.root / "dl"))
    for name in (
        "misclassified/gallery.png",
        "gradcam/layer3.png",
        "gradcam/layer4.png",
        "confusion_matrix.png",
        "per_class_accuracy.png",
    ):
        with open(f"{local}/{name}", "rb") as fh:
            assert fh.read(8) == PNG, name
    table = json.load(open(f"{local}/misclassified.json"))
    assert table["columns"] == ["index", "true", "predicted", "confidence"]
    rows = table["data"]
    assert len(rows) == round((1 - metrics["test/accuracy"]) * 128)
    confidences = [r[3] for r in rows]
    assert confidences == sorted(confidences, reverse=True)
    assert all(r[1] != r[2] for r in rows)
    summary = open(f"{local}/confused_pairs.md").read()
    assert summary.startswith("# Most-confused classes") and "| true | predicted as |" in summary


def _direct(store, *args):
    cmd = [sys.executable, "-m", "entrypoints.analyze", "--max_test_samples", "128", "--num_images", "4", *args]
    return subprocess.run(cmd, cwd=REPO, env=store.env(), capture_output=True, text=True, timeout=300)


def test_analyze_by_version_directly(trained, cifar_root):
    """Without `mlflow run`, in this process (the entry point's own process: conftest.trained's analysis, which
    `mlflow run -e analyze` starts as `python -m entrypoints.analyze`)."""
    from cifar_mlflow.cli import invoke

    store, train_run = trained.store, _run_of(trained.store, trained.train_run_id)
    args = ["--model_uri", "models:/cifar10-resnet18/1", "--data_dir", str(cifar_root), "--batch_size", "32"]
    args += ["--target_layers", "layer4.1.conv2", "--max_test_samples", "128", "--num_images", "4"]
    assert invoke(analyze, args) == (0, "")
    run = _analysis_runs(store, train_run.info.run_id)[-1]
    assert run.info.status == "FINISHED" and run.data.tags["model_uri"] == "models:/cifar10-resnet18/1"
    assert run.data.params["eval_batch_size"] == "32" and run.data.params["data/dataset"] == "cifar10"
    arts = {a.path for a in MlflowClient(store.uri).list_artifacts(run.info.run_id, "gradcam")}
    assert arts == {"gradcam/layer4.1.conv2.png"}
    tags = MlflowClient(store.uri).get_model_version("cifar10-resnet18", "1").tags
    assert tags["analysis_run_id"] == run.info.run_id  # the newest analysis


@pytest.mark.parametrize(
    "uri, message",
    [
        ("models:/no-such-model@champion", "no registered model 'no-such-model'; registered models: cifar10-resnet18"),
        ("models:/cifar10-resnet18/7", "'cifar10-resnet18' has no version 7; versions: 1; aliases: @champion -> 1"),
        (
            "models:/cifar10-resnet18@best",
            "'cifar10-resnet18' has no alias @best; versions: 1; aliases: @champion -> 1",
        ),
    ],
)
def test_unknown_model_names_what_exists(trained, cifar_root, uri, message, monkeypatch):
    """In this process (the one-line stderr of the command line: test_bad_uri_form)."""
    store, train_run = trained.store, _run_of(trained.store, trained.train_run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    before = len(_analysis_runs(store, train_run.info.run_id))
    line = one_line(["--model_uri", uri, "--data_dir", str(cifar_root)], command=analyze)
    assert message in line, line
    assert len(_analysis_runs(store, train_run.info.run_id)) == before  # nothing opened


def test_bad_target_layer_through_mlflow_run_fails_the_run(trained, cifar_root):
    store = trained.store
    proc = mlflow_run(
        store, {**TRAINED_ANALYSIS, "data_dir": cifar_root, "target_layers": "layer3,fc2"}, entry="analyze"
    )
    assert proc.returncode != 0
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert (
        "'fc2' is not a layer of this model; valid: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4" in line
    )
    client = MlflowClient(store.uri)
    exp = client.get_experiment_by_name(store.experiment).experiment_id
    (failed,) = client.search_runs([exp], "attributes.status = 'FAILED'")
    assert "fc2" in failed.data.tags["failure_reason"]
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")


def test_bad_uri_form(trained):
    """Through the command line: the refusal is stderr's one line, after `error: `."""
    store = trained.store
    proc = _direct(store, "--model_uri", "cifar10-resnet18")
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: model_uri='cifar10-resnet18' is not allowed: expected models:/<name>/<version>")


def test_runs_uri_is_accepted(trained, cifar_root):
    """In this process (the command line and `mlflow run` are the tests above)."""
    from cifar_mlflow.cli import invoke

    store, train_run = trained.store, _run_of(trained.store, trained.train_run_id)
    args = ["--model_uri", f"runs:/{train_run.info.run_id}/model", "--target_layers", "layer4"]
    assert invoke(analyze, [*args, "--data_dir", str(cifar_root), "--max_test_samples", "128"]) == (0, "")
    run = _analysis_runs(store, train_run.info.run_id)[-1]
    assert run.data.tags["model_uri"].startswith("runs:/") and "model_version" not in run.data.tags
    assert run.data.metrics["test/accuracy"] == train_run.data.metrics["test/accuracy"]


def test_models_that_are_not_ours_are_refused_in_words_before_any_data_is_fetched(store, tmp_path, monkeypatch):
    """Issue 26: analyze of another kind of model fetched CIFAR-10 first (offline: a download error), then said
    `not a cifar-mlflow model ('data')`. The model is checked first now, and the line says what is missing."""
    import socket

    import mlflow
    import torch
    from sklearn.linear_model import LogisticRegression

    from cifar_mlflow import data
    from cifar_mlflow.cli import invoke
    from entrypoints.analyze import analyze

    with socket.socket() as s:  # offline: any download attempt would fail with a download error instead
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv(data.URL_ENV, f"http://127.0.0.1:{s.getsockname()[1]}/{data.ARCHIVE}")

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    fit = LogisticRegression().fit(np.random.default_rng(0).random((20, 3)), np.arange(20) % 2)
    with mlflow.start_run() as run:
        # requirements given: else MLflow infers them by loading the model in a process of its own (~10 s)
        mlflow.sklearn.log_model(fit, name="model", registered_model_name="sk", pip_requirements=["scikit-learn"])
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=Echo(), registered_model_name="py", pip_requirements=[])
    with mlflow.start_run() as other:
        mlflow.pytorch.log_model(
            torch.nn.Linear(3, 2), name="model", serialization_format="pickle", pip_requirements=["torch"]
        )
    neither = (
        "it has neither a pytorch flavor holding model.pt2 and model_config.json nor, as older cifar-mlflow models, "
        "a python_function data folder holding model_config.json and weights.safetensors; its flavors: "
    )
    cases = {
        "models:/sk/1": f"models:/sk/1: not a cifar-mlflow model ({neither}python_function, sklearn)",
        "models:/py/1": f"models:/py/1: not a cifar-mlflow model ({neither}python_function)",
        f"runs:/{other.info.run_id}/model": f"runs:/{other.info.run_id}/model: not a cifar-mlflow model (its pytorch "
        "flavor holds no model.pt2; a pickled model.pth is never loaded here)",
        f"runs:/{run.info.run_id}/../..": f"model_uri 'runs:/{run.info.run_id}/../..': name the model's folder "
        f"inside the run (runs:/{run.info.run_id}/model); a path that is empty or climbs out with '..' is not a model",
        "runs:/0123456789abcdef0123456789abcdef/model": "model_uri 'runs:/0123456789abcdef0123456789abcdef/model': "
        "no run '0123456789abcdef0123456789abcdef' in this tracking store",
        "models:/sk@noalias": "model_uri 'models:/sk@noalias': 'sk' has no alias @noalias; versions: 1; aliases: none",
    }
    empty = tmp_path / "no-data"
    for uri, message in cases.items():
        assert invoke(analyze, ["--model_uri", uri, "--data_dir", str(empty)]) == (1, message)
    assert not empty.exists(), "no dataset was read, built or downloaded"
    assert not mlflow.search_runs(filter_string="tags.model_uri != ''", output_format="list"), "no analysis run"
