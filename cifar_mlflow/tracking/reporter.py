"""Per-epoch reporting for engine.fit: each finished epoch's checkpoint, then its metrics and images, written
from a background thread so that training never waits for the tracking store."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cifar_mlflow.tracking.checkpoint_store import entry_of, log_checkpoint
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.tracking.run_lease import RunLease
from cifar_mlflow.training import stop

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class EpochReporter:
    """on_epoch_end for engine.fit: reports each finished epoch from a background thread, in order, checkpoint
    first and then the epoch's metrics, so MLflow never shows an epoch that has no checkpoint and training never
    waits for the store (a slow or restarting server only delays the reports). close() waits for all of them
    and raises the first error.

    lease: this process's RunLease; a checkpoint is written only while it holds. logged_through: the last epoch
    whose metrics the run holds already (a resume from the other slot trains that epoch again): its metrics and
    images are not logged twice."""

    def __init__(self, log: RunLogger, lease: RunLease | None = None, logged_through: int = 0) -> None:
        self.run_id, self.lease, self.logged_through = log.run_id, lease, logged_through
        # A RunLogger of its own for this thread, on the run's one client: a client is a handle on the store that
        # MLflow caches per tracking URI, which every thread of the process shares anyway.
        self.log = RunLogger(log.run_id, log.experiment_id, log.client)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-epoch-reporter")
        self._pending: list[Future] = []
        self._previous: dict[str, Any] | None = None  # the manifest entry of the epoch before
        self.cpu_seconds = 0.0  # CPU time the reporting thread has spent (what tracking takes from training)
        self._failure: BaseException | None = None  # the first report that failed

    def __call__(
        self, epoch: int, metrics: dict[str, float], capture: Any, images: dict[str, Callable[[], Figure]] | None = None
    ) -> None:
        """images: key -> a function building the figure to log with mlflow's log_image(key=key, step=epoch);
        built in the reporting thread (rendering takes a few hundred ms)."""
        self._raise_finished_errors()
        state = capture()  # copied now, on the training thread: the model keeps changing afterwards
        self._pending.append(self._pool.submit(self._report, epoch, dict(metrics), state, images or {}))

    def _report(
        self, epoch: int, metrics: dict[str, float], state: dict[str, Any], images: dict[str, Callable[[], Figure]]
    ) -> None:
        start = time.thread_time()
        try:
            self._report_epoch(epoch, metrics, state, images)
        except BaseException as exc:  # training stops at its next batch with this error, not an epoch later
            self._failure = exc
            stop.request(exc)
            raise
        finally:
            self.cpu_seconds += time.thread_time() - start

    def _report_epoch(
        self, epoch: int, metrics: dict[str, float], state: dict[str, Any], images: dict[str, Callable[[], Figure]]
    ) -> None:
        if self.lease is not None:
            self.lease.check()
        if self._previous is None and epoch > 1:  # the first epoch this process reports, on a resume
            self._previous = entry_of(self.log, epoch - 1)
        self._previous = log_checkpoint(self.log, state, epoch, self._previous)
        if epoch <= self.logged_through:
            return
        self.log.log_metrics(metrics, step=epoch)
        for key, build in images.items():
            self.log.log_image(build, key=key, step=epoch)

    def _raise_finished_errors(self) -> None:
        for fut in [f for f in self._pending if f.done()]:
            self._pending.remove(fut)
            fut.result()

    def close(self) -> None:
        try:
            for fut in self._pending:
                fut.result()
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)
            if self._failure is not None:  # raised here (or by the loop already): not again by a later loop
                stop.withdraw(self._failure)
