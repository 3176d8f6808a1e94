"""From a model URI to its registered version and the run that trained it; the analysis run linked both ways. The
model is resolved before the analysis run opens, through the client that run then uses (the caller's)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import LoggedModelInput
from mlflow.exceptions import MlflowException

from cifar_mlflow.errors import ModelError
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.tracking.registry import logged_model_id, versions_of
from cifar_mlflow.tracking.runs import open_run


@dataclass(frozen=True)
class ModelRef:
    """What a model URI points at: the registered name and version (None for runs:/ and logged-model URIs),
    and the run that trained it (None for a model logged outside any run)."""

    uri: str
    name: str | None
    version: str | None
    run_id: str | None
    model_id: str | None = None  # the MLflow 3 logged model (None for models logged by MLflow 2)


def _describe_versions(client: MlflowClient, name: str) -> str:
    versions = sorted(int(v.version) for v in versions_of(client, name))
    aliases = client.get_registered_model(name).aliases
    alias_text = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    return f"versions: {', '.join(map(str, versions)) or 'none'}; aliases: {alias_text}"


def resolve_model(client: MlflowClient, uri: str) -> ModelRef:
    """Resolve models:/name/version, models:/name@alias, models:/<logged model id> or runs:/<run id>/<path>.
    An unknown name, version or alias is a one-line ModelError naming what exists."""
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/") :].partition("/")
        if ".." in path.split("/") or not path.strip("/"):
            raise ModelError(
                f"model_uri {uri!r}: name the model's folder inside the run (runs:/{run_id}/model); a path that is "
                "empty or climbs out with '..' is not a model"
            )
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ModelError(f"model_uri {uri!r}: no run {run_id!r} in this tracking store") from None
        return ModelRef(uri, None, None, run_id, _run_model_id(client, run_id, path))
    rest = uri[len("models:/") :]
    name, sep, ref = rest.partition("@") if "@" in rest else rest.partition("/")
    if not sep:  # models:/<logged model id> (MLflow 3)
        try:
            return ModelRef(uri, None, None, client.get_logged_model(name).source_run_id, name)
        except MlflowException:
            pass
    try:
        client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise ModelError(
            f"model_uri {uri!r}: no registered model {name!r}; registered models: {', '.join(names) or 'none yet'}"
        ) from None
    try:
        mv = client.get_model_version_by_alias(name, ref) if sep == "@" else client.get_model_version(name, ref)
    except MlflowException:
        what = f"alias @{ref}" if sep == "@" else f"version {ref}"
        raise ModelError(f"model_uri {uri!r}: {name!r} has no {what}; {_describe_versions(client, name)}") from None
    return ModelRef(uri, name, str(mv.version), mv.run_id, logged_model_id(mv))


def _run_model_id(client: MlflowClient, run_id: str, path: str) -> str | None:
    """The logged model a run logged under this name (runs:/<run>/model), or None (MLflow 2 runs)."""
    outputs = client.get_run(run_id).outputs
    for output in (outputs.model_outputs if outputs else None) or []:
        with contextlib.suppress(MlflowException):
            if client.get_logged_model(output.model_id).name == path.strip("/"):
                return str(output.model_id)
    return None


def run_params(client: MlflowClient, run_id: str | None) -> dict[str, str]:
    """The training run's params ({} for a model logged outside any run)."""
    return client.get_run(run_id).data.params if run_id else {}


@contextlib.contextmanager
def analysis_run(ref: ModelRef, client: MlflowClient) -> Iterator[RunLogger]:
    """Open the analysis run (or the one `mlflow run` created) on `client`, tagged with the model it analyses; the
    model version is tagged back with this run's id, so the lineage reads both ways."""
    with open_run(client=client) as log:
        log.set_tags(
            {
                "model_uri": ref.uri,
                **({"training_run_id": ref.run_id} if ref.run_id else {}),
                **({"model_name": ref.name, "model_version": ref.version} if ref.name else {}),
            }
        )
        if ref.name:
            log.client.set_model_version_tag(ref.name, ref.version, "analysis_run_id", log.run_id)
        if ref.model_id:
            # MLflow 3's link: the model is an input of this run, and the metrics logged here are the model's too
            log.client.log_inputs(log.run_id, models=[LoggedModelInput(ref.model_id)])
            log.model_id = ref.model_id
        yield log
