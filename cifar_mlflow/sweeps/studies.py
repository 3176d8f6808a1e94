"""The search side of a sweep, knowing nothing of MLflow: creating or joining a study, drawing a trial's
parameters, sharing trials among workers, and Optuna's figures of the study. Its storage, heartbeats and the retry
of dead workers' trials are sweeps/study_storage.py's.

Workers share a study through its RDB storage: each asks Optuna for the next trial (a retry of an interrupted one
first: Optuna hands out WAITING trials before new ones) until the study holds n_trials trials that are finished,
pruned or being run. Two workers asking at once can overshoot; the later trial sees it (`claim`) and is closed
FAIL as surplus, before any work."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import Trial, TrialState

from cifar_mlflow.errors import ConfigError, TrackingError, first_line
from cifar_mlflow.sweeps import study_storage
from cifar_mlflow.sweeps.search_space import Dim

JOIN_WAIT_S = 60.0  # how long a joining worker waits for the creator to record the study's recipe
# What a trial records about itself (user attrs, copied to a retry): the MLflow run it trains in.
RUN_ATTR = "mlflow_run_id"
SURPLUS_ATTR = "surplus"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


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
            raise TrackingError(
                f"study={name!r} exists but its creator did not finish recording its recipe and parent run within "
                f"{JOIN_WAIT_S:g} s (it may have died while creating it); use another study name"
            )
        time.sleep(0.5)
    attrs = study.user_attrs
    # the recipe first: its refusal names the value that differs (a metric of the other direction among them)
    theirs = json.loads(attrs.get("recipe", "{}"))
    differ = sorted(k for k in set(theirs) | set(recipe) if theirs.get(k) != recipe.get(k))
    if differ:
        k = differ[0]
        raise ConfigError(
            f"study={name!r} exists with {k}={theirs.get(k)!r}, not {recipe.get(k)!r}: its trials would not "
            f"compare with this worker's; use the same parameters ({', '.join(differ)} differ) or another study name"
        )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study={name!r} exists and is to {study.direction.name.lower()} its metric, not {direction}: "
            "use another study name"
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
    study_storage.record_worker(trial)
    return True


def ask(study: optuna.Study) -> Trial:
    """The next trial (a WAITING retry first). Optuna warns that heartbeats are meant for study.optimize: this
    sweep beats them itself (study_storage.heartbeat())."""
    with study_storage.quiet():
        return study.ask()


def figures(study: optuna.Study) -> dict[str, Any]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as matplotlib figures,
    by artifact name; a figure Optuna cannot draw yet (importances need two finished trials with varied
    parameters) is left out."""
    from optuna.visualization import matplotlib as vis

    out: dict[str, Any] = {}
    with study_storage.quiet():  # ExperimentalWarning on every call
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


def trials_table(trials: list[Any], dims: list[Dim]) -> dict[str, list[Any]]:
    """The study's trials as columns (the sweep's trials.json): number, state, value, epochs run, each dimension's
    value, the trial it retried and its run."""

    def value(t: Any) -> float | None:
        return t.value if t.value is not None and math.isfinite(t.value) else None

    return {
        "trial": [t.number for t in trials],
        "state": [t.state.name for t in trials],
        "value": [value(t) for t in trials],
        "epochs_run": [max(t.intermediate_values, default=0) for t in trials],
        **{d.name: [t.params.get(d.name) for t in trials] for d in dims},
        "retry_of": [study_storage.retried_from(t) for t in trials],
        "run_id": [t.user_attrs.get(RUN_ATTR) for t in trials],
    }
