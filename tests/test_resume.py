"""Nothing lost: a real `mlflow run` killed with SIGKILL in epoch 3 resumes with `mlflow run --run-id` and ends
exactly where an uninterrupted run ends; SIGTERM and Ctrl-C end a run KILLED with its last checkpoint valid; a
NaN loss stops the run FAILED; a pickle planted as a checkpoint is refused."""

import os
import signal
import subprocess
import time

import pytest
import torch
from mlflow import MlflowClient

from cifar_mlflow.cli import invoke
from cifar_mlflow.errors import ModelError
from cifar_mlflow.tracking import checkpoint_store, lease_records, serving
from cifar_mlflow.tracking.runs import logger_of
from entrypoints.train import train
from tests.conftest import cli_args, mlflow_run_cmd, mlflow_run_process, train_process

FOUR = {
    "epochs": 4,
    "batch_size": 32,
    "num_workers": 0,
    "max_train_samples": 192,
    "max_test_samples": 64,
    "seed": 3,
    "width": 16,
    "log_images_every": 0,
}
METRICS = ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "train/images_per_sec")


@pytest.fixture(scope="module")
def store(module_store):
    return module_store


def _wait_for_epoch(client, run_id_holder, epoch, proc, timeout=180):
    """Poll until the run `proc` trains has `test/accuracy` for `epoch` (metrics land after that epoch's
    checkpoint). Runs that exist already are not it (one an earlier test left RUNNING must not be signalled for)."""
    exp = client.get_experiment_by_name("tests").experiment_id
    earlier = {r.info.run_id for r in client.search_runs([exp])}
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        for run in client.search_runs([exp], "attributes.status = 'RUNNING'"):
            if run.info.run_id in earlier:
                continue
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy")]
            if epoch in steps:
                run_id_holder.append(run.info.run_id)
                return
        time.sleep(0.1)
    raise AssertionError(f"epoch {epoch} never finished")


def _wait_until_its_trainer_is_gone(client, run_id, timeout=60):
    """SIGKILL is sent, not done: a process with a GB of memory, on a loaded machine, takes a moment to exit, and
    until it has, its lease holds (a resume then is refused with exit 75, "try again later", as it should be)."""
    deadline = time.time() + timeout
    while True:
        run = client.get_run(run_id)
        _, holder = lease_records.latest(run.data.params, run.data.tags)
        if holder is None or not holder.alive(time.time()):
            return
        assert time.time() < deadline, f"the killed trainer {holder.pid} still runs {timeout} s after SIGKILL"
        time.sleep(0.2)


def _weights(version):
    net, _ = serving.load_torch_model(f"models:/cifar10-resnet18/{version}")
    return net.state_dict()


def test_sigkill_in_epoch_3_then_resume_matches_an_uninterrupted_run(store, cifar_root, monkeypatch, capsys):
    client = MlflowClient(store.uri)
    params = {**FOUR, "data_dir": cifar_root}
    proc = mlflow_run_process(store, params)
    holder = []
    try:
        _wait_for_epoch(client, holder, 2, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: mlflow CLI and the trainer
        proc.wait()
    run_id = holder[0]
    _wait_until_its_trainer_is_gone(client, run_id)
    killed = client.get_run(run_id)
    assert killed.info.status == "RUNNING"  # nobody could say otherwise: that is what a crash leaves
    assert [m.step for m in client.get_metric_history(run_id, "test/accuracy")] in ([1, 2], [1, 2, 3])

    # resuming with other parameters is refused, naming them. (In this process, as `mlflow run --run-id` runs the
    # entry point: with MLFLOW_RUN_ID set and no params logged by MLflow; one process start less.)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    code, line = invoke(train, cli_args({**params, "epochs": 5, "lr": 0.1}))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # (MLflow removes it itself when that run ends)
    assert code == 1
    assert (
        f"run {run_id} was logged with other parameters: epochs (run: '4', now: 5); lr (run: 'scaled', now: 0.1)"
        in line
    )

    resumed = subprocess.run(
        mlflow_run_cmd(params, run_id=run_id),
        cwd=store.root,
        env=store.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] in ("2", "3")
    for key in METRICS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3, 4], key

    # an uninterrupted run with the same seed ends identically (in this process: a third process, after the
    # killed and the resuming one)
    assert invoke(train, cli_args(params)) == (0, "")
    other = client.search_runs(
        [run.info.experiment_id], "attributes.status = 'FINISHED'", order_by=["start_time DESC"]
    )[0]
    assert other.info.run_id != run_id
    for key in ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr"):
        assert other.data.metrics[key] == run.data.metrics[key], key
    a, b = _weights(run.data.tags["registered_model_version"]), _weights(other.data.tags["registered_model_version"])
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # resuming a finished run does nothing
    capsys.readouterr()
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    assert invoke(train, cli_args(params)) == (0, "")
    assert "nothing to resume" in capsys.readouterr().out
    assert len(client.search_model_versions("name='cifar10-resnet18'")) == 2


DIRECT = "--epochs 20 --batch_size 32 --num_workers 0 --max_train_samples 128 --max_test_samples 32 --width 16"
DIRECT = (DIRECT + " --log_images_every 0").split()


def _direct(store, *args):
    return train_process(store, [*DIRECT, *args])


@pytest.mark.parametrize(
    "sig, status_reason, code, group",
    [
        (signal.SIGTERM, "terminated by SIGTERM", 143, False),
        (signal.SIGINT, "interrupted (Ctrl-C)", 130, False),
        # as `timeout`, `kill -- -PGID` and init systems deliver it: to the process and to its whole group at once,
        # loader workers included (they had died, and torch raised "DataLoader worker ... killed by signal")
        (signal.SIGTERM, "terminated by SIGTERM", 143, True),
    ],
    ids=["sigterm", "ctrl-c", "sigterm-to-the-group-with-workers"],
)
def test_sigterm_and_ctrl_c_end_the_run_killed_keeping_the_checkpoint(
    store, cifar_root, sig, status_reason, code, group
):
    client = MlflowClient(store.uri)
    name = f"killed-{sig.name}-{'group' if group else 'pid'}"
    workers = ["--num_workers", "2"] if group else []
    proc = _direct(store, "--data_dir", str(cifar_root), "--registered_model_name", name, *workers)
    holder = []
    try:
        _wait_for_epoch(client, holder, 1, proc)
        proc.send_signal(sig)
        if group:
            os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: ") and "the run is KILLED" in err
    assert "Traceback" not in err, err[-3000:]
    run = client.get_run(holder[0])
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == status_reason
    state = checkpoint_store.load_latest_checkpoint(logger_of(client, run.info.run_id))  # valid, and loads safely
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test/accuracy")}
    assert state["epoch"] == max(logged) and logged[state["epoch"]] == state["history"][-1]["test/accuracy"]
    assert not client.search_model_versions(f"name='{name}'")


def test_nan_loss_fails_the_run_tagged_with_the_step(store, cifar_root):
    client = MlflowClient(store.uri)
    exp = client.get_experiment_by_name("tests").experiment_id
    before = {r.info.run_id for r in client.search_runs([exp])}
    args = [*DIRECT, "--data_dir", str(cifar_root), "--lr", "1e6", "--scheduler", "none", "--momentum", "0"]
    code, line = invoke(train, [*args, "--registered_model_name", "nan-model"])
    assert code == 1
    assert line.startswith("the training loss became nan at step ") or "became inf" in line, line
    (run,) = [r for r in client.search_runs([exp]) if r.info.run_id not in before]
    assert run.info.status == "FAILED" and int(run.data.tags["diverged_at_step"]) >= 1
    assert "TrainingDiverged" in run.data.tags["failure_reason"]
    assert not client.search_model_versions("name='nan-model'")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_planted_as_the_checkpoint_is_refused_not_executed(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(store.uri)
    run_id = client.create_run(client.get_experiment_by_name("tests").experiment_id).info.run_id
    evil = tmp_path / "checkpoint.pt"
    torch.save({"format": 1, "model": _Payload()}, evil)
    client.log_artifact(run_id, str(evil), "checkpoints/slot-a")
    client.log_dict(
        run_id,
        {"epoch": 1, "path": "checkpoints/slot-a/checkpoint.pt", "sha256": checkpoint_store._sha256(evil)},
        "checkpoints/latest.json",
    )
    with pytest.raises(ModelError, match="not a loadable checkpoint"):
        checkpoint_store.load_latest_checkpoint(logger_of(client, run_id))
    assert not (tmp_path / "PWNED").exists()
    # and a manifest that does not match the file is refused too
    client.log_dict(
        run_id, {"epoch": 1, "path": "checkpoints/slot-a/checkpoint.pt", "sha256": "0" * 64}, "checkpoints/latest.json"
    )
    with pytest.raises(ModelError, match="does not match the SHA-256"):
        checkpoint_store.load_latest_checkpoint(logger_of(client, run_id))


def test_a_read_only_artifact_store_mid_run_stops_training_at_once_with_the_right_advice(
    store, cifar_root, monkeypatch, capsys
):
    """Issue 26: the second epoch's checkpoint fails (the artifact store went read-only: EROFS from the write).
    The advice was "free space" for any OSError, and training went on for another whole epoch before the error
    surfaced; now the next batch stops it, and the run ends FAILED with the reason and its epoch-1 checkpoint, from
    which it resumes (in an upgraded environment: see the end)."""
    import errno

    from cifar_mlflow.training import checkpoint

    real_save = checkpoint.save

    def read_only_from_epoch_2(state, path):
        if state["epoch"] >= 2:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "save", read_only_from_epoch_2)
    code, message = invoke(train, cli_args({**FOUR, "data_dir": cifar_root, "registered_model_name": "ro"}))
    client = MlflowClient(store.uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id], "params.registered_model_name = 'ro'"
    )
    assert (code, message) == (
        1,
        "cannot write the checkpoint of epoch 2 (Read-only file system); make the artifact store writable again "
        f"(it is mounted read-only), then resume the run (mlflow run --run-id {run.info.run_id})",
    )
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == f"StorageError: {message}"
    out = capsys.readouterr().out
    assert "epoch 2/4" in out and "epoch 3/4" not in out, "training stopped in epoch 3, at its next batch"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy")] == [1]
    assert checkpoint_store.load_latest_checkpoint(logger_of(client, run.info.run_id))["epoch"] == 1

    # The store is writable again; the resume runs where torch has been upgraded meanwhile (another machine, a
    # pip upgrade after the crash): a resume, not another run. The new environment is tagged, not refused.
    from cifar_mlflow.jobs import train as train_job

    monkeypatch.setattr(checkpoint, "save", real_save)
    upgraded = {**train_job.versions(), "torch": "9.9.9"}
    monkeypatch.setattr(train_job, "versions", lambda: upgraded)
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    code, message = invoke(train, cli_args({**FOUR, "data_dir": cifar_root, "registered_model_name": "ro"}))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # (MLflow removes it itself as that run ends)
    assert (code, message) == (0, "")
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == "1"
    assert run.data.params["env/torch_version"] != "9.9.9" and run.data.tags["resumed_env/torch_version"] == "9.9.9"
    assert "note: resuming in another environment (env/torch_version " in capsys.readouterr().out
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy")] == [1, 2, 3, 4]


def test_sigterm_during_registration_then_resume_gives_exactly_one_version(store, cifar_root, monkeypatch):
    """Issue 26's probe: SIGTERM while the model is being logged and registered (after the last epoch's flip-TTA
    metric, which is logged just before), then `--run-id` resume: one version, @champion on it."""
    client = MlflowClient(store.uri)
    name = "sigterm-at-registration"
    args = ["--data_dir", str(cifar_root), "--registered_model_name", name, "--epochs", "2", "--batch_size", "16"]
    args += ["--max_train_samples", "256", "--max_test_samples", "128", "--width", "16"]  # TINY's: a model that learns
    args += ["--log_images_every", "0"]
    proc = _direct(store, *args)
    exp = client.get_experiment_by_name("tests").experiment_id
    try:
        deadline = time.time() + 300
        run_id = None
        while time.time() < deadline and proc.poll() is None:
            found = client.search_runs([exp], f"params.registered_model_name = '{name}'")
            if found and "test/accuracy_tta" in found[0].data.metrics:
                run_id = found[0].info.run_id
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert run_id is not None and proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and client.get_run(run_id).info.status == "KILLED"
    assert len(client.search_model_versions(f"name='{name}'")) <= 1
    # the resume in this process, as `mlflow run --run-id` runs the entry point (test_sigkill_in_epoch_3_... resumes
    # through `mlflow run` itself)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    assert invoke(train, [*DIRECT, *args]) == (0, "")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # (MLflow removes it itself when the run ends)
    versions = client.search_model_versions(f"name='{name}'")
    assert [v.run_id for v in versions] == [run_id]
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(versions[0].version)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["registered_model_version"] == str(versions[0].version)
