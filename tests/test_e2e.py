"""End to end, as a user runs it: `mlflow run . --env-manager local -P ...` on generated CIFAR-layout data with a
real sqlite store, then a fresh process loads the registered model both ways; bad input fails cleanly."""

import json
import subprocess
import sys
import textwrap

import pytest
from mlflow import MlflowClient

from cifar_mlflow.config import TrainConfig
from cifar_mlflow.params_doc import ENTRY_POINTS
from tests.conftest import REPO, TINY, mlflow_run, runs_of

METRICS = {"train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "train/images_per_sec"}


def test_mlflow_run_trains_logs_and_registers(trained, cifar_root):
    """The shared store's training run (conftest.trained: `mlflow run` with TRAINED's parameters)."""
    store, client, run_id = trained.store, MlflowClient(trained.store.uri), trained.train_run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"

    # params: every config field (the -P spelling kept), plus derived values
    params = run.data.params
    assert set(f for f in TrainConfig.__dataclass_fields__) <= set(params)
    assert params["lr"] == "6.25e-3" and params["epochs"] == "3" and params["optimizer"] == "sgd"
    assert params["model/num_params"] == "701466"  # ResNet18 at width 16 (11,173,962 at 64: test_models.py)
    assert params["data/train_size"] == "256" and params["data/test_size"] == "128"
    assert len(params["data/mean"].split(",")) == 3 and len(params["data/std"].split(",")) == 3
    assert params["env/device"] == "cpu" and params["env/precision"] in ("bf16", "fp32")
    assert params["env/loader"] == "workers" and "env/precision_emulated" not in params
    assert params["env/torch_version"] == "2.14.0" and params["env/mlflow_version"] == "3.17.2"

    # every metric exactly once per epoch, steps 1 to 3; system metrics sampled too
    for key in METRICS:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    assert 0 <= run.data.metrics["test/accuracy"] <= 1
    assert 0 < run.data.metrics["perf/seconds_after_last_epoch"] < 60
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)

    # dataset inputs
    inputs = {(i.dataset.name, i.tags[0].value) for i in run.inputs.dataset_inputs}
    assert inputs == {("cifar10", "training"), ("cifar10", "evaluation")}

    # artifacts are real files
    local = client.download_artifacts(run_id, "", str(store.root / "dl"))
    for name in ("curves.png", "augmented_samples.png"):
        with open(f"{local}/{name}", "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert "701,466" in open(f"{local}/model_summary.txt").read()
    augmentations = open(f"{local}/augmentations.txt").read()
    assert "Cutout(" in augmentations and "clipped at the border (DeVries & Taylor 2017" in augmentations

    # the GradCAM panel, logged with log_image(key, step=epoch) after every epoch (auto, for 3 epochs)
    panels = sorted(a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png"))
    assert [p.split("+")[:3] for p in panels] == [["images/gradcam_panel", "step", str(e)] for e in (1, 2, 3)]
    with open(f"{local}/{panels[-1]}", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    # registry: version 1 with tags and the champion alias
    mv = client.get_model_version_by_alias("cifar10-resnet18", "champion")
    assert str(mv.version) == "1" and mv.run_id == run_id
    assert mv.tags["run_id"] == run_id and mv.tags["epochs"] == "3"
    assert float(mv.tags["test_accuracy"]) == pytest.approx(run.data.metrics["test/accuracy"], abs=1e-6)
    assert "registered models:/cifar10-resnet18/1  (now @champion)" in trained.train_stdout

    # a fresh process loads models:/cifar10-resnet18@champion both ways and predicts probabilities (stock MLflow
    # without the project: tests/test_stock_mlflow.py)
    script = textwrap.dedent(f"""
        import json, numpy as np, mlflow, torch
        from cifar_mlflow import data, models
        from cifar_mlflow.tracking.serving import load_torch_model
        uri = "models:/cifar10-resnet18@champion"
        test = data.read_cifar10({str(cifar_root)!r}, max_test=128).test
        x = (test.images.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
        pyfunc = mlflow.pyfunc.load_model(uri)
        p = np.asarray(pyfunc.predict(list(x)))
        net, spec = load_torch_model(uri)
        q = models.predict_proba(net, torch.from_numpy(x)).numpy()
        print(json.dumps({{"shape": p.shape, "sums": [float(p.sum(1).min()), float(p.sum(1).max())],
            "max_diff": float(abs(p - q).max()), "module": type(net).__name__,
            "acc": float((p.argmax(1) == test.labels).mean()), "classes": pyfunc.metadata.metadata["class_names"]}}))
    """)
    env = store.env()
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=store.root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shape"] == [128, 10] and got["module"] == "CifarResNet"
    assert got["sums"][0] == pytest.approx(1, abs=1e-5) and got["sums"][1] == pytest.approx(1, abs=1e-5)
    assert got["max_diff"] < 1e-5
    assert got["classes"][0] == "red-disc"
    # the run's accuracy was measured under bf16 autocast, this one in fp32: allow a couple of borderline images
    assert got["acc"] == pytest.approx(run.data.metrics["test/accuracy"], abs=3 / 128)


# Every bad value of every parameter, and an unknown parameter, is refused in-process by every entry point
# (tests/test_hostile_input.py: PARAM_CASES, test_unknown_parameter); one goes through the whole `mlflow run` path,
# to show that the run it created ends FAILED with the reason. A -P the MLproject does not declare: MLflow passes it
# on as an option, which the command refuses (a bad value takes the same path: cli.run_cli). A data error later on
# (after the heavy imports) fails the run mlflow run made in one line too: test_crafted_data_files.py, in a process
# started as mlflow run starts it; the offline download's message: test_cifar_files.py, test_data.py.
def test_bad_parameters_fail_before_training(store, cifar_root):
    message = "No such option '--no_such_param'"
    proc = mlflow_run(store, {**TINY, "data_dir": cifar_root, "no_such_param": 1})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (run,) = runs_of(store)
    assert run.info.status == "FAILED" and message in run.data.tags["failure_reason"]
    assert "train/loss" not in run.data.metrics


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch_size", "-1"], "Invalid value for '--batch_size': -1 is not in the range x>=1"),
        (["--epochs", "two"], "'two' is not a valid integer"),
        (["--precision", "fp64"], "'fp64' is not one of 'auto', 'fp32', 'bf16', 'fp16'"),
    ],
)
def test_bad_parameters_without_mlflow_run_create_no_run(store, args, message):
    proc = _direct_train(store, *args)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.split('error: ', 1)[1].strip()}"]
    assert message in proc.stderr
    assert runs_of(store) == []


def _direct_train(store, *args):
    fixed = "--dataset synthetic --epochs 2 --batch_size 16 --max_train_samples 256 --max_test_samples 64"
    fixed += " --num_workers 0 --width 16 --log_images_every 0 --registered_model_name synthetic-test"
    cmd = [sys.executable, "-m", "entrypoints.train", *fixed.split(), *args]
    return subprocess.run(cmd, cwd=REPO, env=store.env(), capture_output=True, text=True, timeout=300)


def test_direct_run_on_synthetic_data(store):
    """Without `mlflow run` the entry point opens its own run. (Runs are deterministic across processes:
    tests/test_resume.py compares two separate `mlflow run`s weight for weight.)"""
    proc = _direct_train(store, "--seed", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_of(store)
    assert run.info.status == "FINISHED" and run.data.params["dataset"] == "synthetic"
    assert run.data.params["data/train_size"] == "256" and run.data.tags["registered_model_version"] == "1"
    assert MlflowClient(store.uri).get_model_version_by_alias("synthetic-test", "champion").run_id == run.info.run_id


@pytest.mark.parametrize("module, config", [(module, config) for config, module in ENTRY_POINTS.values()])
def test_help_lists_every_option_without_importing_torch(module, config):
    """The one `--help` check of every entry point (its speed: tests/test_benchmarks.py). -X importtime lists on
    stderr every module the process imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in config.__dataclass_fields__:
        assert f"--{name}" in proc.stdout
    # every option explains itself: its reason, what is allowed, and its default
    assert proc.stdout.count("Allowed:") == proc.stdout.count("[default:") == len(config.__dataclass_fields__)
    loaded = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "click" in loaded, "no import listed: -X importtime did not report"
    assert "torch" not in loaded and "mlflow" not in loaded
