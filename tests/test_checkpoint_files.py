"""Checkpoints a crash, a disk or a person left behind: a malformed manifest (never followed), a truncated latest
slot (the other slot is used), a checkpoint missing its RNG state, a kill between registering and tagging, and a
disk filling up while the first checkpoint is written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifar_mlflow import data
from cifar_mlflow.cli import invoke
from cifar_mlflow.tracking.checkpoint_store import load_latest_checkpoint
from cifar_mlflow.tracking.runs import logger_of
from entrypoints.train import train
from tests.conftest import REPO, TINY, cli_args


@pytest.fixture(scope="module", autouse=True)
def store(module_store):
    """One store for the module (every test's, so none falls back to ./mlflow.db)."""
    return module_store


# TINY's sizes (32 steps at batch 16: a model that clearly learns, so that its version is @champion)
SMALL = {**TINY, "epochs": 2, "dataset": "synthetic"}


@pytest.fixture(scope="module")
def trained_run(store):
    """A finished 2-epoch run (checkpoints: epoch 1 in slot-a, epoch 2 in slot-b), trained in this process:
    (run id, the folder of its artifacts)."""
    code, message = invoke(train, cli_args({**SMALL, "registered_model_name": "resume-me"}))
    assert code == 0, message
    (version,) = MlflowClient(store.uri).search_model_versions("name='resume-me'")
    run = MlflowClient(store.uri).get_run(version.run_id)
    return version.run_id, Path(run.info.artifact_uri.removeprefix("file://"))


@pytest.fixture
def checkpoints(trained_run, tmp_path):
    """The trained run's checkpoints folder, put back as it was after the test."""
    run_id, artifacts = trained_run
    folder = artifacts / "checkpoints"
    shutil.copytree(folder, tmp_path / "backup")
    yield run_id, folder
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "backup", folder)


def _manifest(folder: Path, **changes) -> dict:
    import json

    path = folder / "latest.json"
    manifest = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(manifest))
    return manifest


def _load_latest(run_id: str) -> str:
    from cifar_mlflow.errors import ModelError

    with pytest.raises(ModelError) as err:
        load_latest_checkpoint(logger_of(MlflowClient(), run_id))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("kind", ["list", "no-sha256", "folder", "outside", "epoch-string"])
def test_malformed_manifest_is_one_line_and_not_followed(checkpoints, trained_run, kind):
    import json

    run_id, folder = checkpoints
    manifest = json.loads((folder / "latest.json").read_text())
    bad = {
        "list": [manifest],
        "no-sha256": {k: v for k, v in manifest.items() if k != "sha256"},
        "folder": {**manifest, "path": "checkpoints/slot-b"},
        # another run's checkpoint, two folders up from this run's artifacts: was followed
        "outside": {**manifest, "path": f"../../{run_id}/artifacts/checkpoints/slot-b/checkpoint.pt"},
        "epoch-string": {**manifest, "epoch": "2"},
    }[kind]
    (folder / "latest.json").write_text(json.dumps(bad))
    problem = {
        "list": "a list, not an object",
        "no-sha256": "it has no SHA-256 of 64 hex digits",
        "folder": "path 'checkpoints/slot-b' is not checkpoints/slot-b/checkpoint.pt, where epoch 2 belongs",
        "outside": f"path '../../{run_id}/artifacts/checkpoints/slot-b/checkpoint.pt' is not "
        "checkpoints/slot-b/checkpoint.pt, where epoch 2 belongs",
        "epoch-string": "epoch '2' is not an integer >= 1",
    }[kind]
    assert _load_latest(run_id) == (
        f"run {run_id}: its checkpoint manifest checkpoints/latest.json is malformed "
        f"({problem}); it was not followed. Restore it, or start a new run"
    )


def test_truncated_latest_slot_falls_back_to_the_other_slot(checkpoints, capsys):
    run_id, folder = checkpoints
    latest = folder / "slot-b" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:4096])
    state = load_latest_checkpoint(logger_of(MlflowClient(), run_id))
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert capsys.readouterr().out.strip() == (
        f"run {run_id}: checkpoints/slot-b/checkpoint.pt does not match the SHA-256 in checkpoints/latest.json; "
        "resuming from the other slot, checkpoints/slot-a/checkpoint.pt (epoch 1)"
    )


def test_checkpoint_without_rng_is_one_line(checkpoints):
    """With no other slot to fall back on (a manifest without `previous`, as older runs wrote)."""
    import torch

    run_id, folder = checkpoints
    path = folder / "slot-b" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["rng"]
    torch.save(state, path)
    _manifest(folder, sha256=data.file_digest(path, "sha256"), previous=None)
    assert _load_latest(run_id) == (
        f"run {run_id}: checkpoints/slot-b/checkpoint.pt: not a complete cifar-mlflow checkpoint (it lacks 'rng')"
    )


def test_killed_right_after_registration_then_resumed_registers_nothing_new(store, trained_run, monkeypatch):
    """The state a SIGKILL between registering the version and tagging the run leaves (version 1 exists, the run
    is RUNNING without registered_model_* tags); a failed resume attempt in between left a failure_reason.
    The resume adds no version 2, tags the run with version 1, settles @champion there, and clears the reason."""
    run_id, _ = trained_run
    client = MlflowClient(store.uri)
    for tag in ("registered_model_name", "registered_model_version", "champion"):
        client.delete_tag(run_id, tag)
    client.delete_registered_model_alias("resume-me", "champion")
    client.set_tag(run_id, "failure_reason", "RuntimeError: an earlier resume failed")
    client.update_run(run_id, status="RUNNING")
    history = {
        k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in ("test/accuracy", "test/accuracy_tta")
    }
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    code, message = invoke(train, cli_args({**SMALL, "registered_model_name": "resume-me"}))
    assert (code, message) == (0, "")
    versions = client.search_model_versions("name='resume-me'")
    assert [str(v.version) for v in versions] == ["1"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert run.data.tags["registered_model_version"] == "1" and run.data.tags["champion"] == "true"
    assert str(client.get_model_version_by_alias("resume-me", "champion").version) == "1"
    assert {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in history} == history


def _new_run(store) -> str:
    client = MlflowClient(store.uri)
    return client.create_run(client.get_experiment_by_name(store.experiment).experiment_id).info.run_id


def test_disk_full_mid_run_is_one_line_and_fails_the_run(store):
    """Writes past 3 MB fail (RLIMIT_FSIZE, as a disk filling up): the first checkpoint (5.7 MB at width 16; the
    store's database stays near 1 MB) cannot be written (torch's writer reports it without an errno). The run ends FAILED with the reason, and the user sees
    one line, not a 40-line traceback."""
    import resource

    client = MlflowClient(store.uri)
    run_id = _new_run(store)
    limit = 3 * 1024 * 1024

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.train", *cli_args({**SMALL, "epochs": 1})],
        cwd=REPO,
        env=store.env(MLFLOW_RUN_ID=run_id),
        preexec_fn=limited,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = (
        f"error: cannot write the checkpoint of epoch 1 (the write failed: is the disk full?); free space, then "
        f"resume the run (mlflow run --run-id {run_id})"
    )
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (1, line), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "StorageError: " + line.removeprefix("error: ")
