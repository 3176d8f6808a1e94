"""The model registry: log a trained model and register it as a version tagged with its test accuracy, and keep
the `champion` alias on the best version, race-safe."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from cifar_mlflow import models
from cifar_mlflow.errors import ModelError
from cifar_mlflow.tracking import serving
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.training import stop

CHAMPION = "champion"
# "Clearly above chance": a model that guesses (accuracy 1/C on average) scores above chance + 3 standard errors of
# a binomial proportion on n test images with probability ~0.13% (one-sided normal tail), so a version below that
# bar has shown no learning. The bar never sits closer to chance than 5 points: on CIFAR-10's 10,000 test images
# 3 standard errors are 0.9 points, and a model 1 point above chance is as useless as one at it.
CHANCE_SIGMAS = 3.0
CHANCE_MIN_MARGIN = 0.05


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str
    is_champion: bool
    withheld: str | None = None  # why `champion` was withheld from it (a model at chance), or None
    model_id: str | None = None  # its MLflow 3 logged model (None for versions registered before MLflow 3)


def chance_bar(num_classes: int, test_size: int) -> float:
    """The test accuracy a model must exceed to count as having learned (CHANCE_SIGMAS above)."""
    chance = 1.0 / num_classes
    error = math.sqrt(chance * (1 - chance) / max(test_size, 1))
    return chance + max(CHANCE_SIGMAS * error, CHANCE_MIN_MARGIN)


def at_chance(test_accuracy: float, num_classes: int, test_size: int) -> str | None:
    """Why a model with this test accuracy may not be champion (one line), or None when it clearly learned."""
    bar = chance_bar(num_classes, test_size)
    if test_accuracy > bar:
        return None
    return (
        f"test accuracy {test_accuracy:.4f} is not clearly above chance ({1 / num_classes:.3f} for {num_classes} "
        f"classes; it must exceed {bar:.3f} on {test_size} test images): the model learned nothing"
    )


def log_and_register_model(
    log: RunLogger,
    model: Any,
    spec: models.ModelSpec,
    input_example: np.ndarray,
    registered_name: str,
    test_accuracy: float,
    epochs: int,
    *,
    test_size: int,
) -> RegisteredVersion:
    """Log the model to the run, register it as a new version tagged with its test accuracy, and move the
    `champion` alias to it if it beats the current champion (or there is none) and is clearly above chance (a
    version at chance is registered, for comparison, but never champion). A run that registered a version
    already (killed right after registering, then resumed) keeps that version: none is added.
    The logged model (tracking.serving) carries the run's metrics of its last epoch, test/accuracy among them."""
    # A stop (Ctrl-C, SIGTERM) waits for the next step: raised inside torch.export or MLflow's client it can land in
    # a lock, or in a weakref callback that swallows it (seen in CI: a SIGTERM'd registration that went on).
    with stop.deferred():
        mv = version_of_run(log.client, registered_name, log.run_id)
        if mv is None:
            model_id = serving.log_model(log, model, spec, input_example, step=epochs)
            stop.check()
            reason = at_chance(test_accuracy, spec.num_classes, test_size)
            tags = {
                "test_accuracy": f"{test_accuracy:.6f}",
                "epochs": str(epochs),
                "run_id": log.run_id,
                "test_size": str(test_size),
                "above_chance": str(reason is None).lower(),
                **({"champion_withheld": reason} if reason else {}),
            }
            mv = mlflow.register_model(f"models:/{model_id}", registered_name, tags=tags)
            stop.check()
        return _settle_and_tag(log, registered_name, str(mv.version))


def finish_registration(log: RunLogger, registered_name: str) -> RegisteredVersion:
    """A run killed right after registering its version: settle `champion` and tag the run, registering
    nothing new."""
    return _settle_and_tag(log, registered_name, str(version_of_run(log.client, registered_name, log.run_id).version))


def _settle_and_tag(log: RunLogger, registered_name: str, version: str) -> RegisteredVersion:
    client = log.client
    is_champion = settle_champion(client, registered_name) == version
    mv = client.get_model_version(registered_name, version)
    withheld = _withheld(mv)
    tags = {
        "registered_model_name": registered_name,
        "registered_model_version": version,
        "champion": str(is_champion).lower(),
        **({"champion_withheld": withheld} if withheld else {}),
    }
    client.log_batch(log.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    uri = f"models:/{registered_name}/{version}"
    return RegisteredVersion(registered_name, version, uri, is_champion, withheld, logged_model_id(mv))


def logged_model_id(version: Any) -> str | None:
    """The MLflow 3 logged model a version was registered from: its model_id, or the id its source names
    (models:/<model id>); None for versions registered from a run's artifact path (MLflow 2)."""
    if getattr(version, "model_id", None):
        return str(version.model_id)
    source = str(getattr(version, "source", "") or "")
    rest = source.removeprefix("models:/")
    return rest if source.startswith("models:/m-") and "/" not in rest else None


def _withheld(version: Any) -> str | None:
    """Why the champion rule passes this version over (it was registered at chance), or None."""
    if version.tags.get("above_chance") != "false":
        return None
    return version.tags.get("champion_withheld", "its test accuracy is not clearly above chance")


def _quoted(value: str) -> str:
    """A string literal for MLflow's search filters, which have no escape: single quotes, or double quotes
    around a value holding a single quote."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ModelError(f"{value!r} holds both quote characters, which MLflow's search filters cannot express")


def versions_of(client: MlflowClient, name: str) -> list[Any]:
    return client.search_model_versions(f"name={_quoted(name)}")


def version_of_run(client: MlflowClient, name: str, run_id: str) -> Any:
    """The version of `name` registered from this run (tagged run_id), or None."""
    try:
        return next((v for v in versions_of(client, name) if v.tags.get("run_id") == run_id), None)
    except MlflowException:
        return None


def _accuracy_tag(version: Any) -> float | None:
    """A version's test_accuracy tag as a fraction 0-1, or None where it holds none: a version registered by
    hand, by another tool, or tagged in the UI ("n/a", "", "93%") takes no part in the champion rule."""
    try:
        value = float(version.tags.get("test_accuracy", "nan"))
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None  # NaN fails both comparisons


def _best_version(client: MlflowClient, name: str) -> str | None:
    """The version with the highest test_accuracy tag; ties go to the earlier version (it got there first)."""
    scored = [
        (accuracy, -int(v.version), str(v.version))
        for v in versions_of(client, name)
        if (accuracy := _accuracy_tag(v)) is not None and _withheld(v) is None
    ]
    return max(scored)[2] if scored else None


def settle_champion(client: MlflowClient, name: str, attempts: int = 10) -> str | None:
    """Point `champion` at the best version, race-safe without a compare-and-set: write the best of a fresh
    read, read again, and repeat until the alias and the best agree. Two runs registering at once both end
    with the alias on the better one, whichever writes last."""
    for _ in range(attempts):
        best = _best_version(client, name)
        if best is None:
            return None
        current = current_champion(client, name)
        if current is None or str(current.version) != best:
            try:
                client.set_registered_model_alias(name, CHAMPION, best)
            except MlflowException as exc:
                if not _alias_collided(exc):
                    raise
                # another run created the alias at the same moment (the store checks, then inserts): read again
        time.sleep(0.05)
        current = current_champion(client, name)
        if current is not None and str(current.version) == _best_version(client, name):
            return str(current.version)
    return best


# What a store says when two writers insert the same new alias at once: sqlite, PostgreSQL, MySQL.
ALIAS_COLLISIONS = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def _alias_collided(exc: MlflowException) -> bool:
    return "registered_model_aliases" in str(exc) and any(words in str(exc) for words in ALIAS_COLLISIONS)


def current_champion(client: MlflowClient, name: str) -> Any:
    """The model version holding the champion alias, or None (no such model, or no alias yet)."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
