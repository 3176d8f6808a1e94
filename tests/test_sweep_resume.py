"""Nothing lost in a sweep: `mlflow run -e sweep` killed (SIGKILL, the whole process group) in the middle of a trial
and started again with the same study continues under the same parent run; the finished trial stays, the interrupted
one is failed and retried in its own run, resumed from its checkpoint. SIGTERM ends the trial's run KILLED and
leaves its retry waiting; `mlflow run --run-id <the sweep's run>` continues the sweep in that run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from cifar_mlflow.cli import invoke
from entrypoints.sweep import sweep
from tests.conftest import Store, cli_args, mlflow_run, mlflow_run_process, train_process

# 3 epochs of 256 images per trial: long enough to be killed between two epochs of the second trial
PARAMS = {
    "n_trials": 3,
    "epochs": 3,
    "dataset": "synthetic",
    "batch_size": 32,
    "lr": 0.02,
    "augment": "none",
    "num_workers": 0,
    "max_train_samples": 256,
    "max_test_samples": 64,
    "width": 16,
    "pruner": "none",
    "registered_model_name": "sweep-resume",
}


def _trial_run(client: MlflowClient, store: Store, number: int):
    exp = client.get_experiment_by_name(store.experiment).experiment_id
    found = client.search_runs([exp], f"tags.`trial/number` = '{number}'")
    return found[0] if found else None


def _wait_for_epoch(client, store, proc, number: int, epoch: int, timeout: float = 600) -> str:
    """The run of trial `number` once it has logged `epoch` (its checkpoint is written before its metrics)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the sweep exited ({proc.returncode}) before trial {number} reached epoch {epoch}"
        run = _trial_run(client, store, number)
        if run is not None and any(
            m.step >= epoch for m in client.get_metric_history(run.info.run_id, "test/accuracy")
        ):
            return run.info.run_id
        time.sleep(0.2)
    pytest.fail(f"trial {number} did not reach epoch {epoch} in {timeout:.0f} s")


def _study(store: Store, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{store.root / 'optuna.db'}")


def test_sweep_killed_mid_trial_continues_under_the_same_parent(store: Store, tmp_path):
    client = MlflowClient(store.uri)
    params = {**PARAMS, "study": "resume-me", "data_dir": tmp_path / "data"}
    first = mlflow_run_process(store, params, entry="sweep")
    try:
        killed_run = _wait_for_epoch(client, store, first, number=1, epoch=1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: nothing runs any cleanup
        first.wait()
    exp = client.get_experiment_by_name(store.experiment).experiment_id
    (parent,) = client.search_runs([exp], "tags.`sweep/role` = 'parent'")
    assert client.get_run(killed_run).info.status == "RUNNING", "SIGKILL leaves the trial's run as it was"

    # started again with the same study (in this process: `mlflow run --run-id` is the next test's way back)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store.root)  # as `mlflow run` in the store's folder
        assert invoke(sweep, cli_args(params)) == (0, "")

    trials = _study(store, "resume-me").get_trials()
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], states
    retry = trials[2]
    assert retry.params == trials[1].params and retry.system_attrs["retry_history"] == [1]
    assert retry.user_attrs["mlflow_run_id"] == trials[1].user_attrs["mlflow_run_id"] == killed_run

    resumed = client.get_run(killed_run)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["trial/retry_of"] == "1"
    assert int(resumed.data.tags["resumed_from_epoch"]) >= 1, "the retry resumed the run from its checkpoint"
    steps = [m.step for m in client.get_metric_history(killed_run, "test/accuracy")]
    assert sorted(steps) == [1, 2, 3], "every epoch logged exactly once"

    runs = client.search_runs([exp])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    roles = sorted(r.data.tags.get("sweep/role", "trial") for r in children)
    assert roles == ["trial", "trial", "trial", "worker"], "three trial runs and the restarted worker's run"
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/trials_complete"] == 3
    assert parent.data.metrics["sweep/trials_failed"] == 1
    assert len(client.search_model_versions("name = 'sweep-resume'")) == 1


def test_sigterm_ends_the_trials_run_killed_and_run_id_continues_it(store: Store, tmp_path):
    client = MlflowClient(store.uri)
    params = {**PARAMS, "n_trials": 2, "study": "term", "data_dir": tmp_path / "data"}
    proc = train_process(store, cli_args(params), entry="sweep")
    run_id = _wait_for_epoch(client, store, proc, number=0, epoch=1)
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 143, stderr[-3000:]
    assert "terminated (SIGTERM)" in stderr
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "terminated by SIGTERM"
    assert run.data.tags["trial/state"] == "FAIL"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    trials = _study(store, "term").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["mlflow_run_id"] == run_id

    # MLflow's own way back into a run: `mlflow run --run-id <the sweep's run>` continues it as the parent
    again = mlflow_run(store, params, entry="sweep", run_id=parent.info.run_id, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/trials_complete"] == 2
    assert "failure_reason" not in parent.data.tags
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["trial/retry_of"] == "0"
    assert "failure_reason" not in resumed.data.tags and int(resumed.data.tags["resumed_from_epoch"]) >= 1
    exp = parent.info.experiment_id
    assert not client.search_runs([exp], "tags.`sweep/role` = 'worker'"), "the same run, not a worker beside it"
