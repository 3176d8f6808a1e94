"""Model files in the registry that someone else may have changed: code planted beside a model (never run by
load_torch_model; run by pyfunc loading, as MLflow designs it and docs/security.md says), a tampered or huge model
config, an MLmodel pointing outside the model, a GradCAM layer that cannot be explained, names holding a quote."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from cifar_mlflow import data, models
from cifar_mlflow.tracking import registry, runs, serving
from entrypoints.analyze import analyze
from tests.conftest import one_line


@pytest.fixture(scope="module", autouse=True)
def store(module_store):
    """One store for the module (every test's, so none falls back to ./mlflow.db)."""
    return module_store


SPEC = models.ModelSpec("resnet18", data.SYNTHETIC_CLASSES, (0.5,) * 3, (0.25,) * 3, width=16)
PWNED = "import pathlib; pathlib.Path({marker!r}).write_text('code from the artifact store ran')\n"


@pytest.fixture(scope="module")
def registered(store):
    """A model registered as `tamper-me` version 1 (in-process, like a training run's last step): the folder
    holding its files in the artifact store."""
    import torch

    torch.manual_seed(0)
    net = models.build_model(SPEC).eval()
    example = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    with runs.open_run() as log:
        version = registry.log_and_register_model(log, net, SPEC, example, "tamper-me", 0.5, epochs=1, test_size=300)
    source = MlflowClient().get_model_version("tamper-me", version.version).source  # models:/m-<id>
    folder = Path(mlflow.get_logged_model(source.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    assert (folder / "MLmodel").is_file()
    return folder


@pytest.fixture
def model_dir(registered, tmp_path):
    """The registered model's folder in the store, put back as it was after the test."""
    backup = tmp_path / "backup"
    shutil.copytree(registered, backup)
    yield registered
    shutil.rmtree(registered)
    shutil.copytree(backup, registered)


_LOAD_PYFUNC = """
import mlflow, numpy as np
model = mlflow.pyfunc.load_model("models:/tamper-me/1")
print(np.asarray(model.predict([np.zeros((3, 32, 32), np.float32)] * 2)).shape)
"""


def _load_pyfunc_in_a_fresh_process(store, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _LOAD_PYFUNC], cwd=cwd, env=store.env(), capture_output=True, text=True, timeout=300
    )


def test_registered_model_ships_no_code_so_code_planted_in_the_store_never_runs(store, model_dir, tmp_path):
    """The issue's attack: a line appended to the model's code/cifar_mlflow/__init__.py in the artifact store ran
    on every pyfunc load. MLmodel names no code folder (the model's one code file is served_model.py, executed by
    path), so a package planted there is never imported."""
    import yaml

    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    marker = tmp_path / "PWNED"
    package = model_dir / "code" / "cifar_mlflow"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "tracking.py"):  # appended to what the old layout shipped, else planted
        with open(package / name, "a") as fh:
            fh.write("\n" + PWNED.format(marker=str(marker)))
    proc = _load_pyfunc_in_a_fresh_process(store, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "(2, 10)"
    net, spec = serving.load_torch_model("models:/tamper-me/1")
    assert spec == SPEC and not marker.exists(), "code from the artifact store ran"
    assert not mlmodel["flavors"]["python_function"].get("code")


def test_mlmodel_naming_planted_code_runs_as_pyfunc_but_never_in_load_torch_model(store, model_dir, tmp_path):
    """What docs/security.md states: a pyfunc model is code by MLflow's design (mlflow.pyfunc.load_model executes the
    model's served_model.py, so whoever can rewrite it in the store runs code there); load_torch_model reads
    MLmodel, the config and the weights, and executes nothing of the model's."""
    marker = tmp_path / "PWNED"
    with open(model_dir / "served_model.py", "a") as fh:
        fh.write("\n" + PWNED.format(marker=str(marker)))

    serving.load_torch_model("models:/tamper-me/1")
    assert not marker.exists()
    # in this process: MLflow executes a code model's file at every load (test_registered_model_ships_no_code_...
    # needs a fresh process, where a planted package could be imported for the first time)
    model = mlflow.pyfunc.load_model("models:/tamper-me/1")
    assert np.asarray(model.predict([np.zeros((3, 32, 32), np.float32)] * 2)).shape == (2, 10)
    assert marker.exists(), "docs/security.md says pyfunc loading executes the model's served_model.py; it did not"


def _edit_config(model_dir: Path, **changes) -> None:
    import json

    path = model_dir / serving.PYTORCH_DATA / models.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _analyze_line(*extra: str) -> str:
    return one_line(
        ["--model_uri", "models:/tamper-me/1", "--dataset", "synthetic", "--max_test_samples", "16", *extra],
        command=analyze,
    )


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"mean": [0.5] * 5}, "mean must be 3 numbers in [0, 1], one per RGB channel, got [0.5, 0.5, 0.5, 0.5, 0.5]"),
        ({"mean": ["a", "b", "c"]}, 'mean must be 3 numbers in [0, 1], one per RGB channel, got ["a", "b", "c"]'),
        ({"std": [0, 0.2, 0.2]}, "std must be 3 numbers in (0, 1], one per RGB channel, got [0, 0.2, 0.2]"),
        (
            {"class_names": [f"c{i}" for i in range(12)]},
            "not loadable weights for resnet18 (fc.weight has shape (10, 128); model_config.json's network (12 classes, "
            "batch norm) needs (12, 128))",
        ),
        ({"class_names": "cat"}, "class_names must list 2 to 1000 names (strings of 1-200 characters), got str"),
        ({"arch": "resnet1000"}, "arch 'resnet1000' is not one of resnet18, resnet34"),
        ({"format_version": "1"}, "format_version '1' is not supported (expected 1)"),
    ],
    ids=["mean-of-5", "mean-strings", "std-zero", "wrong-class-count", "class-names-string", "arch", "version-str"],
)
def test_tampered_model_config_is_one_line(store, model_dir, change, reason):
    _edit_config(model_dir, **change)
    message = _analyze_line()
    file = serving.EXPORTED_FILE if reason.startswith("not loadable") else models.CONFIG_FILE
    assert message.endswith(f"/{serving.PYTORCH_DATA}/{file}: {reason}"), message


def test_huge_model_config_is_refused_before_parsing(store, model_dir):
    """The issue's 5 MB config with a million class names allocated 2.8 GB before it was refused."""
    path = model_dir / serving.PYTORCH_DATA / models.CONFIG_FILE
    _edit_config(model_dir, class_names=[f"c{i}" for i in range(1_000_000)])
    size = path.stat().st_size
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = _analyze_line()
    assert message.endswith(
        f"/{serving.PYTORCH_DATA}/{models.CONFIG_FILE}: {size:,} bytes is not a model config (at most "
        "65,536); refused before parsing"
    ), message
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, f"peak memory grew by {grown_mb:.0f} MB"


def test_mlmodel_pointing_the_data_outside_the_model_is_refused(store, model_dir):
    import yaml

    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    mlmodel["flavors"]["pytorch"]["model_data"] = "../../../../../../../../etc"
    (model_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    assert _analyze_line() == (
        "models:/tamper-me/1: its MLmodel points the model's data outside the model's folder; refused"
    )


def test_target_layer_that_gradcam_cannot_explain_fails_before_a_run_opens(store, registered):
    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name(store.experiment).experiment_id
    before = len(client.search_runs([experiment]))
    assert _analyze_line("--target_layers", "fc") == (
        "target_layers: 'fc' outputs shape (1, 10) (a vector per image), not a convolutional feature map that "
        "GradCAM can explain; valid: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4 (or a dotted path "
        "inside one)"
    )
    assert len(client.search_runs([experiment])) == before, "a run was opened"


def test_search_filters_quote_names_holding_a_quote(store, registered):
    """Names made elsewhere (or read from a model URI) may hold a quote: the registry is still searched, not
    handed a broken filter."""
    client = MlflowClient(store.uri)
    client.create_registered_model("it's")
    client.create_model_version("it's", "models:/tamper-me/1", tags={"run_id": "r1", "test_accuracy": "0.5"})
    assert str(registry.version_of_run(client, "it's", "r1").version) == "1"
    assert registry.settle_champion(client, "it's") == "1"
