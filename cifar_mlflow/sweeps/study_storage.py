"""Where a sweep's workers meet, knowing nothing of MLflow or of what a trial searches: the Optuna study's RDB
storage, the heartbeat a worker beats while it runs a trial, and the retry of the trials of workers that died.

A trial is RUNNING while a thread of its worker beats Optuna's heartbeat; one whose worker died (no beat for
GRACE_S, or at once if it was a process of this machine that is gone) is failed and re-enqueued as a WAITING copy
(Optuna's RetryHeartbeatStaleTrialCallback, at most RETRIES times) carrying its user attrs, among them the MLflow run
it trained in (studies.RUN_ATTR), so the retry resumes that run from its checkpoint. sweeps/studies.py asks for trials."""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from cifar_mlflow.errors import TrackingError, first_line
from cifar_mlflow.tracking import lease_records

HEARTBEAT_S = 30  # a RUNNING trial's worker records a beat this often...
GRACE_S = 120  # ...and is taken for dead after this long without one (a worker on another machine)
RETRIES = 2  # an interrupted trial is retried at most this many times
# Who runs a trial now (user attrs, copied to a retry): a process of this machine that is gone is dead at once.
HOST_ATTR, PID_ATTR, STARTED_ATTR = "host", "pid", "process_started"


def redacted(url: str) -> str:
    """The URL as it may be printed or logged: without its password."""
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url.split("@")[-1]


def open_storage(url: str) -> RDBStorage:
    """The study storage, with heartbeats (a dead worker's trial is failed and retried). One line naming the
    storage (password hidden) if it cannot be opened. Workers started at once on an empty storage all create
    Optuna's tables: all but one lose that race (PostgreSQL: a duplicate pg_type row; sqlite: "table already
    exists") and try again, finding the tables made."""
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with quiet():  # ExperimentalWarnings: heartbeats have been in Optuna since 2.9
                return RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=RETRIES, inherit_intermediate_values=True
                    ),
                    # sqlite: workers of one machine wait for each other's writes instead of failing at once
                    engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                )
        except Exception as exc:  # sqlalchemy and the drivers raise many types: all mean "cannot use this storage"
            if attempt + 1 < CREATE_ATTEMPTS and _lost_creation_race(exc):
                time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
                continue
            if "optuna storage upgrade" in str(exc):  # a storage an older Optuna made: Optuna's own remedy, whole
                made = re.search(r"set up by optuna ([\w.]+)", str(exc))
                by = f"Optuna {made.group(1)}" if made else "an older Optuna"
                raise TrackingError(
                    f"storage={redacted(url)!r} was made by {by}, whose tables Optuna {optuna.__version__} no "
                    f"longer reads; take a backup of it, then run `optuna storage upgrade --storage {redacted(url)}`"
                ) from None
            raise TrackingError(f"storage={redacted(url)!r} cannot be opened ({first_line(exc, 200)})") from None
    raise AssertionError("unreachable")


CREATE_ATTEMPTS = 5


def _lost_creation_race(exc: Exception) -> bool:
    from sqlalchemy import exc as sa

    text = str(exc)
    return isinstance(exc, sa.IntegrityError | sa.ProgrammingError) or (
        isinstance(exc, sa.OperationalError) and ("already exists" in text or "database is locked" in text)
    )


def record_worker(trial: Trial) -> None:
    """Record this process as the one running the trial (fail_dead reads it)."""
    me = lease_records.this_process(time.time())
    for key, value in ((HOST_ATTR, socket.gethostname()), (PID_ATTR, os.getpid()), (STARTED_ATTR, me.started)):
        trial.set_user_attr(key, value)


@contextlib.contextmanager
def heartbeat(storage: RDBStorage, trial: Trial) -> Iterator[None]:
    """Beat the trial's heartbeat while it runs (study.optimize does this itself; ask-and-tell does not)."""
    ended = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a storage that is down: the next beat tries again
                storage.record_heartbeat(trial._trial_id)
            if ended.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        ended.set()
        thread.join(timeout=10)


def retry(storage: RDBStorage, study: optuna.Study, trial: FrozenTrial) -> None:
    """Fail an interrupted trial and enqueue its retry (Optuna's retry callback: same parameters and user attrs,
    `failed_trial` and `retry_history` recorded), unless it was retried RETRIES times already."""
    if storage.get_trial(trial._trial_id).state.is_finished():
        return
    storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        callback(study, storage.get_trial(trial._trial_id))


def fail_dead(storage: RDBStorage, study: optuna.Study) -> list[int]:
    """Retry the RUNNING trials of workers that died: a process of this machine that is gone, at once (a restart
    right after a crash need not wait out the heartbeat), and any worker silent for GRACE_S (Optuna's own
    fail_stale_trials). Returns the numbers of the trials failed here."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid, started = t.user_attrs.get(HOST_ATTR), t.user_attrs.get(PID_ATTR), t.user_attrs.get(STARTED_ATTR)
        if host != socket.gethostname() or not isinstance(pid, int) or not isinstance(started, float):
            continue
        if not lease_records.Holder("", host, pid, started, float("inf")).alive(time.time()):
            retry(storage, study, t)
            failed.append(t.number)
    with quiet():  # ExperimentalWarning: the function is public since Optuna 2.9
        optuna.storages.fail_stale_trials(study)
    return failed


def retry_of(storage: RDBStorage, trial: Trial) -> int | None:
    """The number of the failed trial an asked trial retries (its latest attempt), or None."""
    return retried_from(storage.get_trial(trial._trial_id))


def retried_from(trial: FrozenTrial) -> int | None:
    """The number of the failed trial this one retries (Optuna's retry_history, latest attempt last), or None."""
    history = trial.system_attrs.get("retry_history")
    return history[-1] if history else None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Optuna's warnings silenced: ExperimentalWarnings on long-public features, heartbeats used with ask-and-tell."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
