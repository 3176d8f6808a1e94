"""The Optuna side of a sweep, knowing nothing of MLflow: the study's storage, creating or joining a study, drawing
a trial's parameters, sharing trials among workers, and retrying the trials of workers that died.

Workers share a study through its RDB storage: each asks Optuna for the next trial (a retry of an interrupted one
first: Optuna hands out WAITING trials before new ones) until the study holds n_trials trials that are finished,
pruned or being run. Two workers asking at once can overshoot; the later trial sees it (`claim`) and is closed
FAIL as surplus, before any work. A trial is RUNNING while a thread of its worker beats Optuna's heartbeat; one
whose worker died (no beat for GRACE_S, or at once if it was a process of this machine that is gone) is failed and
re-enqueued as a WAITING copy (Optuna's RetryHeartbeatStaleTrialCallback, at most RETRIES times) carrying its user attrs,
among them the MLflow run it trained in, so the retry resumes that run from its checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from cifar_mlflow import lease
from cifar_mlflow.errors import ConfigError, TrackingError, first_line
from cifar_mlflow.sweep_space import Dim

HEARTBEAT_S = 30  # a RUNNING trial's worker records a beat this often...
GRACE_S = 120  # ...and is taken for dead after this long without one (a worker on another machine)
RETRIES = 2  # an interrupted trial is retried at most this many times
JOIN_WAIT_S = 60.0  # how long a joining worker waits for the creator to record the study's recipe
# What a trial records about itself (user attrs, copied to a retry): its MLflow run, and who runs it now.
RUN_ATTR, HOST_ATTR, PID_ATTR, STARTED_ATTR = "mlflow_run_id", "host", "pid", "process_started"
SURPLUS_ATTR = "surplus"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


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
            with _quiet():  # ExperimentalWarnings: heartbeats have been in Optuna since 2.9
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


def make_pruner(name: str, after_trials: int, after_epochs: int) -> optuna.pruners.BasePruner:
    """The pruner by name; steps are epochs (1-based), so none is pruned before epoch `after_epochs`."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=after_trials, n_warmup_steps=after_epochs)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=after_epochs)
    return optuna.pruners.NopPruner()


def open_study(
    storage: RDBStorage,
    name: str,
    *,
    direction: str,  # maximize or minimize
    recipe: dict[str, Any],
    base: dict[str, Any],
    parent_run_id: str,
    pruner: optuna.pruners.BasePruner,
    seed: int,
    n_trials: int,
) -> tuple[optuna.Study, str]:
    """Create the study (recording its recipe and its parent run, and enqueuing the base recipe as the first
    trial) or join it: then (study, the parent run id recorded by its creator). A study whose recipe differs from
    this worker's (metric, space, fixed parameters) is refused with one line: its trials would not compare."""
    sampler = optuna.samplers.TPESampler(n_startup_trials=max(1, min(10, n_trials // 2)), seed=seed)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction=optuna.study.StudyDirection[direction.upper()],
            sampler=sampler,
            pruner=pruner,
        )
    except optuna.exceptions.DuplicatedStudyError:
        # a second worker: its own sampler seed, or it would draw the same parameters as the first
        sampler = optuna.samplers.TPESampler(n_startup_trials=max(1, min(10, n_trials // 2)))
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)
        return study, _joined(study, name, direction, recipe)
    study.set_user_attr("recipe", json.dumps(recipe, sort_keys=True))
    study.enqueue_trial(base, user_attrs={"base_recipe": True})
    study.set_user_attr("parent_run_id", parent_run_id)  # last: a joiner waits for it, then finds all set
    return study, parent_run_id


def _joined(study: optuna.Study, name: str, direction: str, recipe: dict[str, Any]) -> str:
    if "recipe" not in study.user_attrs and study.trials:
        # our creator records the recipe before its first trial: this study was made by something else
        raise ConfigError(
            f"study={name!r} exists in this storage but was not made by a cifar-mlflow sweep ({len(study.trials)} "
            "trials, no recipe); choose another study name"
        )
    deadline = time.monotonic() + JOIN_WAIT_S
    while "parent_run_id" not in study.user_attrs:
        if time.monotonic() > deadline:
            raise TrackingError(f"study {name!r} exists but its creator never recorded its recipe; use a new name")
        time.sleep(0.5)
    attrs = study.user_attrs
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study={name!r} exists and is {study.direction.name.lower()}d: its metric differs")
    theirs = json.loads(attrs.get("recipe", "{}"))
    differ = sorted(k for k in set(theirs) | set(recipe) if theirs.get(k) != recipe.get(k))
    if differ:
        k = differ[0]
        raise ConfigError(
            f"study={name!r} exists with {k}={theirs.get(k)!r}, not {recipe.get(k)!r}: its trials would not "
            f"compare with this worker's; use the same parameters ({', '.join(differ)} differ) or another study name"
        )
    return str(attrs["parent_run_id"])


def suggest(trial: Trial, dims: list[Dim]) -> dict[str, Any]:
    """The trial's values for the searched parameters (an enqueued trial gets its fixed ones)."""
    values: dict[str, Any] = {}
    for dim in dims:
        if dim.type == "categorical":
            values[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
        elif dim.type == "int":
            assert dim.low is not None and dim.high is not None
            values[dim.name] = trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log)
        else:
            assert dim.low is not None and dim.high is not None
            values[dim.name] = trial.suggest_float(dim.name, float(dim.low), float(dim.high), log=dim.log)
    return values


def fits(dim: Dim, value: Any) -> bool:
    """Whether the base recipe's value lies in the dim (then the base is enqueued with it)."""
    if dim.type == "categorical":
        return value in dim.choices
    return (
        isinstance(value, int | float) and dim.low is not None and dim.high is not None and dim.low <= value <= dim.high
    )


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}


def is_full(study: optuna.Study, n_trials: int) -> bool:
    """The study holds n_trials trials finished, pruned, running or waiting: no new one is to be asked for."""
    return sum(t.state in COUNTED for t in study.get_trials(deepcopy=False)) >= n_trials


def is_done(study: optuna.Study, n_trials: int) -> bool:
    """n_trials finished or pruned, and nothing running or waiting."""
    trials = study.get_trials(deepcopy=False)
    return sum(t.state in DONE for t in trials) >= n_trials and not any(
        t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials
    )


def claim(study: optuna.Study, trial: Trial, n_trials: int) -> bool:
    """Mark the asked trial as this process's; False (and the trial closed FAIL, tagged surplus) if workers asking
    at once overshot n_trials and this one came later."""
    before = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and t.state in COUNTED and t.user_attrs.get(SURPLUS_ATTR) is None
    ]
    if len(before) >= n_trials:
        trial.set_user_attr(SURPLUS_ATTR, True)
        study.tell(trial, state=TrialState.FAIL)
        return False
    me = lease.this_process(time.time())
    for key, value in ((HOST_ATTR, socket.gethostname()), (PID_ATTR, os.getpid()), (STARTED_ATTR, me.started)):
        trial.set_user_attr(key, value)
    return True


@contextlib.contextmanager
def heartbeat(storage: RDBStorage, trial: Trial) -> Iterator[None]:
    """Beat the trial's heartbeat while it runs (study.optimize does this itself; ask-and-tell does not)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a storage that is down: the next beat tries again
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
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
        if not lease.Holder("", host, pid, started, float("inf")).alive(time.time()):
            retry(storage, study, t)
            failed.append(t.number)
    with _quiet():  # ExperimentalWarning: the function is public since Optuna 2.9
        optuna.storages.fail_stale_trials(study)
    return failed


def ask(study: optuna.Study) -> Trial:
    """The next trial (a WAITING retry first). Optuna warns that heartbeats are meant for study.optimize: this
    module beats them itself (heartbeat())."""
    with _quiet():
        return study.ask()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def retry_of(storage: RDBStorage, trial: Trial) -> int | None:
    """The number of the failed trial an asked trial retries (its latest attempt), or None."""
    return retried_from(storage.get_trial(trial._trial_id))


def retried_from(trial: FrozenTrial) -> int | None:
    """The number of the failed trial this one retries (Optuna's retry_history, latest attempt last), or None."""
    history = trial.system_attrs.get("retry_history")
    return history[-1] if history else None


def figures(study: optuna.Study) -> dict[str, Any]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as matplotlib figures,
    by artifact name; a figure Optuna cannot draw yet (importances need two finished trials with varied
    parameters) is left out."""
    from optuna.visualization import matplotlib as vis

    out: dict[str, Any] = {}
    with _quiet():  # ExperimentalWarning on every call
        for name, plot in (
            ("optimization_history.png", vis.plot_optimization_history),
            ("param_importances.png", vis.plot_param_importances),
            ("parallel_coordinate.png", vis.plot_parallel_coordinate),
        ):
            try:
                out[name] = plot(study).figure
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                print(f"sweep: {name} not drawn ({first_line(exc, 120)})")
    return out
