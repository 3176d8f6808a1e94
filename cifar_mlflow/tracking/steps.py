"""A pipeline's steps as MLflow runs: launch an entry point of the project as a child run of the pipeline's run, and
find a finished run of an entry point (same code version) whose outputs are still there, to reuse it instead. The
rule for reuse (same parameters, what each step needs) is the pipeline's (jobs.pipeline)."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cifar_mlflow.errors import TrackingError
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.tracking.params import as_param
from cifar_mlflow.tracking.provenance import CODE_VERSION_TAG, code_version
from cifar_mlflow.tracking.runs import FAILURE_TAG


def finished_runs(client: MlflowClient, experiment_id: str, entry_point: str) -> list:
    """The FINISHED runs of this experiment that `entry_point` of this project ran with this code version,
    newest first. (MLflow's multistep example compares the git commit; code_version also sees uncommitted edits.)"""
    query = (
        f"attributes.status = 'FINISHED' and tags.`mlflow.project.entryPoint` = '{entry_point}' "
        f"and tags.{CODE_VERSION_TAG} = '{code_version()}'"
    )
    return client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])


def has_artifacts(client: MlflowClient, run_id: str, *paths: str) -> bool:
    """Does the run still hold each of these artifact files (`folder/name`)? False for one deleted from the
    artifact store since, or a run whose artifacts cannot be listed."""
    try:
        for path in paths:
            folder, _, _name = path.rpartition("/")
            if path not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
                return False
    except (MlflowException, OSError):
        return False
    return True


def model_version_exists(client: MlflowClient, name: str, version: str) -> bool:
    """Is the version registered, with its model's files (MLmodel) still in the artifact store?"""
    try:
        client.get_model_version(name, version)
        files = mlflow.artifacts.list_artifacts(artifact_uri=f"models:/{name}/{version}")
    except (MlflowException, OSError):
        return False
    return any(f.path.rsplit("/", 1)[-1] == "MLmodel" for f in files)


def run_entry_point(project: Path, entry_point: str, params: dict, parent: RunLogger):
    """Run an entry point of the project as a child of `parent` (`mlflow run` semantics: a fresh process and a
    run of its own, tagged with mlflow.parentRunId) and return the run as it ended. A step that failed is a
    TrackingError naming the run and the reason it recorded. The step's run is read through the parent's client."""
    from mlflow.projects import run as run_project

    try:
        submitted = run_project(
            str(project),
            entry_point=entry_point,
            env_manager="local",
            parameters={k: as_param(v) for k, v in params.items()},
            experiment_id=parent.experiment_id,
            run_name=entry_point,
            synchronous=False,
        )
    except MlflowException as exc:
        raise TrackingError(f"pipeline step {entry_point!r} could not start: {exc.message.splitlines()[0]}") from None
    try:
        ok = submitted.wait()
    except BaseException:  # Ctrl-C or SIGTERM of the pipeline: stop the step too (it ends KILLED)
        submitted.cancel()
        raise
    client = parent.client
    run = client.get_run(submitted.run_id)
    if run.info.status == "RUNNING":  # its process exited without closing its run: close it as the process ended
        client.set_terminated(submitted.run_id, "FINISHED" if ok else "FAILED")
        run = client.get_run(submitted.run_id)
    if not ok or run.info.status != "FINISHED":
        why = run.data.tags.get(FAILURE_TAG, "see its log above")
        raise TrackingError(f"pipeline step {entry_point!r} (run {submitted.run_id}) ended {run.info.status}: {why}")
    return run
