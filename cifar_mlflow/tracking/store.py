"""The tracking store: check, before any work, that MLflow can open it (and create a new sqlite one safely), and
whether a server answers; a client of it for the jobs, which do not import mlflow."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cifar_mlflow.errors import TrackingError, first_line


def check_tracking_server(timeout: float = 5.0) -> None:
    """Before any work, the tracking store must be one MLflow can open: an unknown URI is one line at once; a
    server that is down or refuses our credentials fails in seconds with its URI named (instead of after MLflow's
    minutes of retries, or after a whole training run that cannot log); a new sqlite store is created here, one
    process at a time."""
    uri = mlflow.get_tracking_uri()
    try:
        with _sqlite_lock(uri):
            # A probe, dropped (no run's client): MLflow's own registry of store schemes; it creates and migrates a
            # new sqlite file.
            MlflowClient(uri)
    except (MlflowException, ImportError, OSError) as exc:
        if "out-of-date database schema" in str(exc):  # MLflow's own advice, whole: back up, then upgrade
            found = re.search(r"found version (\w+), but expected (\w+)", str(exc))
            versions = f" (schema {found.group(1)}, this MLflow's is {found.group(2)})" if found else ""
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={uri!r} was written by an older MLflow{versions}; take a backup of it, then "
                f"run `mlflow db upgrade {uri}`"
            ) from None
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={uri!r} is not a tracking store MLflow can open "
            f"({_store_problem(exc)}); use sqlite:///<file>, postgresql://, mysql:// or "
            "http(s)://<server>"
        ) from None
    if uri.startswith(("http://", "https://")):
        _probe_server(uri, timeout)


def _store_problem(exc: BaseException) -> str:
    if "unsupported URI" in str(exc):
        return "no store for its scheme"
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc))[:160]


@contextlib.contextmanager
def _sqlite_lock(uri: str) -> Iterator[None]:
    """For a sqlite store, an exclusive lock on its file while MLflow opens it: two runs started at once into an
    empty folder would otherwise both run MLflow's table creation, and one would die ("duplicate column name").
    flock and sqlite's own (fcntl) locks do not interact."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        yield
        return
    import fcntl

    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow would
    with open(path, "ab") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def server_down(timeout: float = 5.0) -> bool:
    """Is the tracking store a server that does not answer now (one request, no retries)? False for local
    stores and for a server that answers, whatever it answers."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return False
    try:
        _ask(uri, timeout)
    except MlflowException:
        return True
    return False


def _ask(uri: str, timeout: float) -> Any:
    """One question to the server through MLflow's own HTTP client (its credentials and TLS settings), no
    retries: the response, whatever its status; MlflowException if nothing answered."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(
        get_default_host_creds(uri),
        "/api/2.0/mlflow/experiments/search",
        "GET",
        max_retries=0,
        timeout=timeout,
        raise_on_status=False,
        params={"max_results": 1},
    )


def give_up_quickly() -> None:
    """From now on, this process's MLflow requests try once, for 5 s: the server is known to be down, and the
    clean-up after it (ending the run, the lease) must not wait through MLflow's retries again."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"


def retry_settings() -> str:
    """MLflow's retry budget for one request, as this process has it (its env vars, or MLflow's defaults)."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    return (
        f"MLFLOW_HTTP_REQUEST_MAX_RETRIES={MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()}, "
        f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR={MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()}"
    )


def _probe_server(uri: str, timeout: float) -> None:
    """One request through MLflow's own HTTP client (so token, basic auth, TLS and auth-plugin settings apply, as
    for every later call), without retries."""
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    try:
        resp = _ask(uri, timeout)
    except MlflowException as exc:
        text = exc.message.lower()
        reason = (
            "connection refused"
            if "refused" in text
            else "its TLS certificate is not trusted: set MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle, or "
            "MLFLOW_TRACKING_INSECURE_TLS=true"
            if "certificate" in text or "ssl" in text
            else f"no answer within {timeout:g} s"
            if "timeout" in text or "timed out" in text
            else exc.message.splitlines()[0][:160]
        )
        raise TrackingError(
            f"tracking server {uri} is unreachable ({reason}); start it, or point MLFLOW_TRACKING_URI at one that is up"
        ) from None
    if resp.status_code in (401, 403):
        if creds.username:
            raise TrackingError(
                f"tracking server {uri} refused the credentials of user {creds.username!r} "
                f"(HTTP {resp.status_code}); check MLFLOW_TRACKING_USERNAME/PASSWORD"
            )
        if creds.token:
            raise TrackingError(
                f"tracking server {uri} refused the token in MLFLOW_TRACKING_TOKEN (HTTP {resp.status_code})"
            )
        raise TrackingError(
            f"tracking server {uri} requires authentication (HTTP {resp.status_code}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if resp.status_code >= 400:
        raise TrackingError(
            f"tracking server {uri} answered HTTP {resp.status_code} to a simple query; is it an MLflow server?"
        )


def new_client() -> MlflowClient:
    """A client of the tracking store, for code that must not import mlflow (the jobs) to read the store before its
    run is opened and then open the run with (tracking.runs.open_run's client)."""
    return MlflowClient()  # the analysis job's one client: its run's RunLogger takes it over


def read_run(client: MlflowClient, run_id: str, note: str = "") -> Any:
    """The run, or a TrackingError naming it (and `note`, where the id came from) and the store."""
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(
            f"run {run_id}{note} cannot be read from {mlflow.get_tracking_uri()} ({first_line(exc)[:160]})"
        ) from None
