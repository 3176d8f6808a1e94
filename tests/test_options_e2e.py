"""Every schedule, optimiser, augmentation preset, model variant and the LR range test, trained a few steps end
to end (options combined so that each run exercises several), checking that each run logs what it claims. The
runs go through the entry points' click commands in this process, against a real sqlite store: the `mlflow run`
path itself is covered by tests/test_e2e.py, and a process start per combination would double these tests'
time."""

import json
import math

import pytest
from mlflow import MlflowClient

from cifar_mlflow.cli import invoke
from cifar_mlflow.tracking.serving import load_torch_model
from cifar_mlflow.training import lr_finder
from entrypoints.lr_find import lr_find
from entrypoints.train import train
from tests.conftest import cli_args

FEW = {"epochs": 2, "batch_size": 32, "num_workers": 0, "max_train_samples": 64, "max_test_samples": 64, "width": 16}


@pytest.fixture(scope="module")
def store(module_store):
    return module_store


def _last_run(store):
    client = MlflowClient(store.uri)
    exp = client.get_experiment_by_name(store.experiment).experiment_id
    return client.search_runs([exp], order_by=["start_time DESC"], max_results=1)[0]


def _train(store, cifar_root, **params):
    code, message = invoke(train, cli_args({**FEW, "data_dir": cifar_root, **params}))
    assert code == 0, message
    run = _last_run(store)
    assert run.info.status == "FINISHED"
    return run, MlflowClient(store.uri)


def _lr_history(client, run):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]


def _artifact_text(client, run, path, store):
    return open(client.download_artifacts(run.info.run_id, path, str(store.root / run.info.run_id))).read()


def _common_checks(client, run, store):
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"lr_schedule.png", "augmented_samples.png", "augmentations.txt", "curves.png"} <= arts
    assert 0 <= run.data.metrics["test/accuracy_tta"] <= 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy_tta")] == [2]


def test_cosine_adam_heavy_groupnorm_l1(store, cifar_root):
    run, client = _train(
        store,
        cifar_root,
        scheduler="cosine",
        optimizer="adam",
        lr=0.001,
        augment="heavy",
        norm="group",
        width=32,  # GroupNorm's 32 groups need a multiple of 32
        l1=1e-5,
        log_images_every=0,
    )
    _common_checks(client, run, store)
    assert client.list_artifacts(run.info.run_id, "images") == []  # log_images_every=0: no panels
    p = run.data.params
    assert (p["scheduler"], p["optimizer"], p["augment"], p["norm"], p["l1"]) == (
        "cosine",
        "adam",
        "heavy",
        "group",
        "1e-05",
    )
    # 64 images / batch 32 = 2 steps per epoch, 4 in all; `lr` is the LR of each epoch's last step (steps 1, 3)
    lrs = _lr_history(client, run)
    assert lrs == pytest.approx([0.001 * (1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 3)])
    listed = _artifact_text(client, run, "augmentations.txt", store)
    for name in ("HorizontalFlip", "Affine", "Cutout", "ColorJitter", "ToGray"):
        assert name in listed
    net, spec = load_torch_model(f"models:/cifar10-resnet18/{run.data.tags['registered_model_version']}")
    assert spec.norm == "group" and type(net.bn1).__name__ == "GroupNorm" and net.bn1.num_groups == 32


def test_plateau_adamw_rotate_layernorm_resnet34(store, cifar_root):
    run, client = _train(
        store,
        cifar_root,
        scheduler="plateau",
        optimizer="adamw",
        lr=0.002,
        augment="rotate",
        norm="layer",
        arch="resnet34",
    )
    _common_checks(client, run, store)
    assert run.data.params["model/num_params"] == "1334618"  # at width 16 (21,282,122 at 64: test_models.py)
    assert _lr_history(client, run) == [0.002, 0.002]  # patience 2: no cut within two epochs
    assert "Rotate" in _artifact_text(client, run, "augmentations.txt", store)
    net, spec = load_torch_model(f"models:/cifar10-resnet18/{run.data.tags['registered_model_version']}")
    assert spec.arch == "resnet34" and net.bn1.num_groups == 1 and len(net.layer3) == 6


def test_cyclic_flip_cutout_with_auto_lr(store, cifar_root):
    # batch 8: lr=auto sweeps at least 40 steps, 320 images at this size instead of 1,280 at FEW's 32
    run, client = _train(store, cifar_root, scheduler="cyclic", augment="flip-cutout", lr="auto", batch_size=8)
    _common_checks(client, run, store)
    assert run.data.params["lr"] == "auto"
    resolved = float(run.data.params["lr/resolved"])
    suggested = run.data.metrics["lr_find/suggested_lr"]
    assert 0.01 <= resolved <= 1.0 and resolved == min(max(suggested, 0.01), 1.0)
    # triangular2 between resolved/10 and resolved: every logged LR lies in that band
    assert all(resolved / 10 - 1e-12 <= lr <= resolved + 1e-12 for lr in _lr_history(client, run))
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "lr_find")}
    assert arts == {"lr_find/curve.png", "lr_find/curve.json"}
    table = json.loads(_artifact_text(client, run, "lr_find/curve.json", store))
    assert table["columns"] == ["lr", "loss", "smoothed_loss"] and len(table["data"]) >= 6
    # the logged curve is enough to check the suggestion: read back (10 decimals), it gives the same LR
    lrs, losses = [row[0] for row in table["data"]], [row[1] for row in table["data"]]
    assert lr_finder.suggest_lr(lrs, losses) == pytest.approx(suggested, rel=1e-4)
    assert "Cutout(" in _artifact_text(client, run, "augmentations.txt", store)


def test_lr_find_entry_point(store, cifar_root, capsys):
    params = {
        "num_iter": 20,
        "batch_size": 8,
        "num_workers": 0,
        "max_train_samples": 64,
        "data_dir": cifar_root,
        "end_lr": 100.0,
    }
    code, message = invoke(lr_find, cli_args(params))
    assert code == 0, message
    run = _last_run(store)
    client = MlflowClient(store.uri)
    assert run.info.status == "FINISHED" and run.data.params["num_iter"] == "20"
    suggested = run.data.metrics["lr_find/suggested_lr"]
    table = json.loads(_artifact_text(client, run, "lr_find/curve.json", store))
    lrs = [row[0] for row in table["data"]]
    assert lrs[0] == pytest.approx(1e-5) and lrs[0] <= suggested <= lrs[-1] and len(lrs) <= 20
    assert "suggested lr" in capsys.readouterr().out
    versions = client.search_model_versions("name='cifar10-resnet18'")
    assert run.info.run_id not in {v.run_id for v in versions}, "the range test registers nothing"
