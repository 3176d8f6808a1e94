"""A run's life: open it (or the one `mlflow run` created) as a RunLogger, tag the code version, end it FAILED or
KILLED with the reason; a RunLogger for a run that exists already (a sweep's parent, its trials)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cifar_mlflow.errors import StoppedEarly, Terminated, TrackingError, TrackingUnavailable
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.tracking.provenance import CODE_VERSION_TAG, code_version
from cifar_mlflow.tracking.run_lease import RunLease
from cifar_mlflow.tracking.store import give_up_quickly, read_run, retry_settings, server_down

FAILURE_TAG = "failure_reason"
DIVERGED_TAG = "diverged_at_step"
PRUNED_TAG = "pruned_at_epoch"
PARENT_TAG = "mlflow.parentRunId"  # how the MLflow UI nests a run under another


@contextlib.contextmanager
def open_run(
    held: RunLease | None = None, run_id: str | None = None, client: MlflowClient | None = None
) -> Iterator[RunLogger]:
    """Open the run: the one `mlflow run` created (MLFLOW_RUN_ID) or a new one, with system metrics sampled and
    the code version tagged, as a RunLogger bound to it. An exception ends it FAILED, Ctrl-C or SIGTERM ends it
    KILLED, each with a tag saying why; success removes a `failure_reason` left by an earlier attempt. held: the
    run is leased to this process while it is open (a new run is claimed as it opens), and the RunLogger uses
    the lease's MLflow client: one client for the run's work. client: the one to use where there is no lease
    (the analysis job's, which read the model's lineage before the run opened); else the RunLogger makes one.

    The one use of MLflow's global active run: MLflow's system-metrics sampler and `pyfunc.log_model` (which
    has no run_id argument) attach to it. run_id: open that run (a sweep's trial, made by child_run) instead,
    nested under the active run if there is one; a trial stopped early (StoppedEarly) ends FINISHED, tagged
    pruned_at_epoch."""
    nested = run_id is not None and mlflow.active_run() is not None
    with mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=True) as run:
        log = RunLogger(run.info.run_id, run.info.experiment_id, held.client if held is not None else client)
        try:
            if held is not None:
                held.claim(log.run_id)
            log.set_tags({CODE_VERSION_TAG: code_version()})
            yield log
            clear_failure(log)
        except StoppedEarly as exc:  # a pruned trial: a finished run, with the epoch it stopped at
            log.set_tags({PRUNED_TAG: str(exc.epoch)})
            clear_failure(log)
        except (KeyboardInterrupt, Terminated) as exc:
            with contextlib.suppress(Exception):
                why = "terminated by SIGTERM" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
                log.set_tags({FAILURE_TAG: why})
                mlflow.end_run("KILLED")
            raise
        except MlflowException as exc:
            if not server_down():
                _tag_failure(log, exc)
                raise
            # The server has been gone for longer than MLflow's retries wait (a report, or the registration, gave
            # up): end here, fast, and leave the run to be resumed (its lease lapses as this process exits).
            retries = retry_settings()
            give_up_quickly()
            with contextlib.suppress(Exception):
                mlflow.end_run("FAILED")  # leaves MLflow's active-run stack at once; the server does not hear it
            # MLflow stops the run's system-metrics sampler only once the server has heard the end: the sampler
            # (a daemon thread) lives on until the process exits, and its "Failed to get mlflow run" warning could
            # follow the one line this process ends with (seen in a coverage run, whose exit is slower).
            logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.CRITICAL)
            raise TrackingUnavailable(
                f"tracking server {mlflow.get_tracking_uri()} stopped answering and MLflow's retries ran out "
                f"({retries}); run {log.run_id} stays resumable with the checkpoints it reported: once the server is "
                f"back, resume it with `mlflow run --run-id {log.run_id}` and the same parameters"
            ) from None
        except BaseException as exc:
            _tag_failure(log, exc)
            raise
        finally:
            if held is not None:  # no renewal may race the run's end (it would set the status back)
                held.stop()


def _tag_failure(log: RunLogger, exc: BaseException) -> None:
    with contextlib.suppress(Exception):
        step = getattr(exc, "step", None)
        log.set_tags(
            {
                FAILURE_TAG: f"{type(exc).__name__}: {exc}"[:5000],
                **({DIVERGED_TAG: str(step)} if step is not None else {}),
            }
        )


def clear_failure(log: RunLogger) -> None:
    """A run that failed before and now succeeded (resumed) is not failed: its old reason goes."""
    tags = log.run().data.tags
    for tag in (FAILURE_TAG, DIVERGED_TAG):
        if tag in tags:
            log.client.delete_tag(log.run_id, tag)


def fail_run_from_env(reason: str) -> None:
    """Bad input found before the run was opened: if `mlflow run` created one (MLFLOW_RUN_ID), end it FAILED
    with the reason, so no run is left RUNNING whoever started the process."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    with contextlib.suppress(Exception):
        client = MlflowClient()  # called once the job is over: its RunLogger and lease, if it made any, are gone
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
        client.set_terminated(run_id, "FAILED")


def run_url(log: RunLogger) -> str:
    """Where to look at the run: the server's page, or the `mlflow ui` command for a local store."""
    uri = mlflow.get_tracking_uri()
    path = f"#/experiments/{log.experiment_id}/runs/{log.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{path}"


def logger_of(client: MlflowClient, run_id: str) -> RunLogger:
    """A RunLogger for an existing run (which need not be open), on `client`. TrackingError if the store has no
    such run."""
    run = read_run(client, run_id)
    if run.info.lifecycle_stage != "active":
        raise TrackingError(f"run {run_id} is deleted in {mlflow.get_tracking_uri()}; restore it or start anew")
    return RunLogger(run_id, run.info.experiment_id, client)
