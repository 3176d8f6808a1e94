"""One run, one trainer: a run leased to a live process is refused untouched, a lease lapses when its holder is
gone or expired, one of several claimants wins, and two resumes of one crashed run at once train it once."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifar_mlflow.tracking.checkpoint_store import load_latest_checkpoint
from cifar_mlflow.tracking.run_lease import RunLease
from cifar_mlflow.tracking.runs import logger_of
from tests.conftest import TINY, at_once, cli_args, mlflow_run_cmd, train_process


@pytest.fixture(scope="module", autouse=True)
def store(module_store):
    """One store for the module (every test's, so none falls back to ./mlflow.db)."""
    return module_store


# TINY's sizes (32 steps at batch 16: a model that clearly learns, so that its version is @champion)
SMALL = {**TINY, "epochs": 2, "dataset": "synthetic"}


def _new_run(store) -> str:
    client = MlflowClient(store.uri)
    return client.create_run(client.get_experiment_by_name(store.experiment).experiment_id).info.run_id


def _busy_line(run_id: str, pid: str, host: str) -> str:
    """The refusal as a regular expression; pid and host are patterns."""
    return (
        rf"run {run_id} is being trained by process {pid} on {host} \(its lease runs until "
        r"\d\d:\d\d:\d\d and is renewed while it trains\); this process stops without touching it: wait for "
        r"that one to end, or resume after it stops"
    )


def test_a_run_leased_to_a_live_process_is_refused_untouched(store, monkeypatch):
    import socket

    from cifar_mlflow.errors import RunBusy

    client = MlflowClient(store.uri)
    run_id = _new_run(store)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    with RunLease():
        before = client.get_run(run_id)
        with pytest.raises(RunBusy) as err:
            RunLease().__enter__()
        assert re.fullmatch(_busy_line(run_id, str(os.getpid()), re.escape(socket.gethostname())), str(err.value))
        after = client.get_run(run_id)
        assert (after.info.status, after.data.params, after.data.tags) == (
            before.info.status,
            before.data.params,
            before.data.tags,
        )
    with RunLease() as again:  # released on exit: the next claim is immediate
        assert again.holder is not None and again.run_id == run_id
    assert sorted(client.get_run(run_id).data.params) == ["lease/1", "lease/2"]


def test_a_lease_lapses_when_its_holder_is_gone_or_expired(store, monkeypatch):
    import socket
    import time

    import psutil

    from cifar_mlflow.errors import RunBusy
    from cifar_mlflow.tracking import lease_records

    client = MlflowClient(store.uri)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    now = time.time()
    cases = [  # (holder, refused?)
        (lease_records.Holder("dead", socket.gethostname(), proc.pid, started, now + 3600), False),  # died here
        (lease_records.Holder("far", "another-host", 4242, now - 10, now + 3600), True),  # alive elsewhere
        (lease_records.Holder("late", "another-host", 4242, now - 10, now - 1), False),  # expired
    ]
    for holder, refused in cases:
        run_id = _new_run(store)
        client.log_param(run_id, "lease/1", holder.to_json())
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
        if refused:
            with pytest.raises(RunBusy):
                RunLease().__enter__()
        else:
            with RunLease() as held:
                assert held.run_id == run_id
            assert "lease/2" in client.get_run(run_id).data.params


def test_of_threads_claiming_one_run_at_once_exactly_one_wins(store):
    from cifar_mlflow.errors import RunBusy

    run_id = _new_run(store)
    leases = [RunLease() for _ in range(4)]
    outcomes = at_once([functools.partial(held.claim, run_id) for held in leases])
    winners = [held for held, outcome in zip(leases, outcomes) if not isinstance(outcome, Exception)]
    assert len(winners) == 1 and all(isinstance(o, RunBusy) for o in outcomes if isinstance(o, Exception)), outcomes
    winners[0].__exit__(None, None, None)


def _start_and_kill_after(store, params: dict, epoch: int, name: str) -> str:
    """A direct training process killed with SIGKILL once `epoch` is reported (checkpoint first, then metrics):
    the run it leaves, RUNNING."""
    import signal
    import time

    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name(store.experiment).experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment])}
    proc = train_process(store, cli_args({**params, "registered_model_name": name}))
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            runs = [r for r in client.search_runs([experiment]) if r.info.run_id not in before]
            if runs and epoch in [m.step for m in client.get_metric_history(runs[0].info.run_id, "test/accuracy")]:
                return runs[0].info.run_id
            time.sleep(0.1)
        raise AssertionError(f"epoch {epoch} was never reported")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_two_resumes_of_one_crashed_run_at_once_train_it_once(store):
    """Issue 15: two `mlflow run --run-id R` at once on a crashed run both trained and both registered
    (test/accuracy [1, 2, 2, 3, 3], versions 1 and 2). Now one holds the run's lease and trains; the other stops
    at once with one line and leaves the run alone. The crash's latest checkpoint is also truncated here, so the
    winner resumes from the other slot and trains epoch 2 again, without logging its metrics twice."""
    params = {**SMALL, "epochs": 3}
    run_id = _start_and_kill_after(store, params, 2, "raced")
    client = MlflowClient(store.uri)
    artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    latest = artifacts / "checkpoints" / "slot-b" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:4096])

    cmd = mlflow_run_cmd({**params, "registered_model_name": "raced"}, run_id=run_id)
    procs = [
        subprocess.Popen(
            cmd, cwd=store.root, env=store.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outcomes = [(*p.communicate(timeout=600), p.returncode) for p in procs]
    codes = sorted(code for _, _, code in outcomes)
    assert codes[0] == 0 and codes[1] != 0, [err[-2000:] for _, err, _ in outcomes]
    (refused,) = [err for _, err, code in outcomes if code != 0]
    (winner,) = [out for out, _, code in outcomes if code == 0]
    assert "Traceback" not in refused
    assert any(re.fullmatch("error: " + _busy_line(run_id, r"\d+", r"\S+"), line) for line in refused.splitlines()), (
        refused[-2000:]
    )
    assert (
        f"run {run_id}: checkpoints/slot-b/checkpoint.pt does not match the SHA-256 in checkpoints/latest.json; "
        "resuming from the other slot, checkpoints/slot-a/checkpoint.pt (epoch 1)"
    ) in winner
    assert f"resuming run {run_id} after epoch 1 of 3" in winner

    run = client.get_run(run_id)
    for key in ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "train/images_per_sec"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    (version,) = client.search_model_versions("name='raced'")
    assert version.run_id == run_id and run.data.tags["registered_model_version"] == "1"
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert run.data.tags["resumed_from_epoch"] == "1"
    assert load_latest_checkpoint(logger_of(client, run_id))["epoch"] == 3
