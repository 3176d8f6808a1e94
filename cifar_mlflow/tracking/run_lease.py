"""This process's lease on the run it trains: claimed before any work, renewed by a thread, released on exit, so
that two processes never train (and checkpoint) the same run. The lease's format is cifar_mlflow.tracking.lease_records."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cifar_mlflow.errors import RunBusy
from cifar_mlflow.tracking import lease_records
from cifar_mlflow.tracking.store import read_run


class RunLease:
    """This process's lease on the run it trains (cifar_mlflow.tracking.lease_records). `with RunLease():` claims the run
    `mlflow run` named (MLFLOW_RUN_ID: a fresh run or a resume) before any work; open_run(held) claims a run it
    creates. A run whose lease a live process holds is refused with RunBusy, before anything in it is changed.
    While held, a daemon thread renews the lease; on exit it is released, so the run can be resumed at once.

    client: the one MLflow client of the run's work. The lease claims the run before its RunLogger exists, so it
    makes the client (unless given one), and open_run(held) hands it on to the run's RunLogger."""

    def __init__(self, run_id: str | None = None, client: MlflowClient | None = None) -> None:
        self._target = run_id  # the run to claim on entry (a sweep's trial); None: the one `mlflow run` named
        # The run's one client, made here: the lease claims the run before its RunLogger exists. A client is a
        # handle on the store MLflow caches per tracking URI (every thread shares it): the renewing thread uses it too.
        self.client = client or MlflowClient()
        self.run_id: str | None = None
        self.holder: lease_records.Holder | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLease:
        target = self._target or os.environ.get("MLFLOW_RUN_ID")
        if target:
            self.claim(target)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self.run_id is not None and self.holder is not None and not self.lost:
            with contextlib.suppress(Exception):
                self.client.set_tag(self.run_id, lease_records.TAG, self.holder.released().to_json())

    def claim(self, run_id: str) -> None:
        if self.run_id == run_id:
            return
        client = self.client
        run = read_run(client, run_id, "" if self._target else " (MLFLOW_RUN_ID)")
        n, holder = lease_records.latest(run.data.params, run.data.tags)
        now = time.time()
        if holder is not None and holder.alive(now):
            raise RunBusy(_busy(run_id, holder))
        mine = lease_records.this_process(now)
        key = f"{lease_records.PARAM_PREFIX}{n + 1}"
        try:  # insert-once: of two processes claiming n + 1, the store lets exactly one write it
            client.log_param(run_id, key, mine.to_json())
        except MlflowException:
            other = client.get_run(run_id).data.params.get(key)
            if other is None:  # not a lost race: the store itself failed
                raise
            raise RunBusy(_busy(run_id, lease_records.Holder.from_json(other))) from None
        client.set_tag(run_id, lease_records.TAG, mine.to_json())
        self.run_id, self.holder = run_id, mine
        self._thread = threading.Thread(target=self._beat, name="mlflow-run-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(lease_records.HEARTBEAT):
            with contextlib.suppress(Exception):  # a store that is down: the next beat tries again
                self.renew()

    def renew(self) -> None:
        """Extend the lease, unless another process has claimed the run since (then `lost`). A refused second
        `mlflow run --run-id` marks the run FAILED as it exits (MLflow's CLI does, not our code): the holder,
        which is still training it, sets it back to RUNNING."""
        assert self.run_id is not None and self.holder is not None, "renew() before claim()"
        client = self.client
        run = client.get_run(self.run_id)
        _, holder = lease_records.latest(run.data.params, run.data.tags)
        if holder is None or holder.id != self.holder.id:
            self.lost = True
            return
        client.set_tag(self.run_id, lease_records.TAG, self.holder.renewed(time.time()).to_json())
        if run.info.status != "RUNNING" and not self._stop.is_set():
            client.update_run(self.run_id, status="RUNNING")

    def check(self) -> None:
        """Before each checkpoint: a process that lost its lease stops instead of overwriting the new holder's."""
        if self.lost:
            raise RunBusy(
                f"run {self.run_id}: another process took over its lease while this one could not renew "
                "it; this one stops without writing more"
            )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


def _busy(run_id: str, holder: lease_records.Holder | None) -> str:
    who = holder.describe() if holder is not None else "another process"
    return (
        f"run {run_id} is being trained by {who}; this process stops without touching it: wait for that one "
        "to end, or resume after it stops"
    )
