"""The one module that talks to MLflow: runs, params, metrics, datasets, artifacts, models and the registry.

A model is logged as a pyfunc whose files are `model_config.json` + `weights.safetensors` (cifar_mlflow.models)
and whose loader is `_load_pyfunc` below, imported from the installed package: no code is shipped with the model,
so loading it as pyfunc (serving) runs only the environment's code, and loading it as a torch.nn.Module
(`load_torch_model`, analysis) reads data files only. Neither unpickles anything.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import Schema, TensorSpec

from cifar_mlflow import checkpoint, lease, models
from cifar_mlflow import data as data_mod
from cifar_mlflow.errors import ConfigError, ModelError, RunBusy, StorageError, Terminated, TrackingError

if TYPE_CHECKING:  # a served model needs no matplotlib
    from matplotlib.figure import Figure

CHAMPION = "champion"
MODEL_NAME_IN_RUN = "model"
FAILURE_TAG = "failure_reason"
_PACKAGE_DIR = Path(__file__).resolve().parent
# What a served model needs (no albumentations/grad-cam): pinned to the versions it was trained with.
_SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "safetensors", "numpy")


def versions() -> dict[str, str]:
    """Library versions logged with every run."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "torchvision", "mlflow", "albumentations", "numpy"):
        out[pkg] = metadata.version(pkg)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Runs


def check_tracking_server(timeout: float = 5.0) -> None:
    """Before any work, the tracking store must be one MLflow can open: an unknown URI is one line at once; a
    server that is down or refuses our credentials fails in seconds with its URI named (instead of after MLflow's
    minutes of retries, or after a whole training run that cannot log); a new sqlite store is created here, one
    process at a time."""
    uri = mlflow.get_tracking_uri()
    try:
        with _sqlite_lock(uri):
            MlflowClient(uri)  # MLflow's own registry of store schemes; creates and migrates a new sqlite file
    except (MlflowException, ImportError, OSError) as exc:
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
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc))[:160]


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


def _probe_server(uri: str, timeout: float) -> None:
    """One request through MLflow's own HTTP client (so token, basic auth, TLS and auth-plugin settings apply, as
    for every later call), without retries."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        resp = http_request(
            creds,
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=0,
            timeout=timeout,
            raise_on_status=False,
            params={"max_results": 1},
        )
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


CODE_VERSION_TAG = "code_version"


@functools.cache  # the files a process runs do not change under it: hash them once (the pipeline asks 4 times)
def code_version() -> str:
    """A digest of the code a run executes (this package, the entry points, MLproject and the pins), tagged on
    every run: the pipeline reuses a step only if it ran the same code. Unlike the git commit it also sees
    uncommitted edits, and it exists where there is no git checkout."""
    import hashlib

    root = _PACKAGE_DIR.parent
    files = sorted([*_PACKAGE_DIR.glob("*.py"), *(root / "entrypoints").glob("*.py")])
    files += [f for f in (root / "MLproject", root / "pyproject.toml") if f.is_file()]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def open_run(held: RunLease | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the run: the one `mlflow run` created (MLFLOW_RUN_ID) or a new one, with system metrics sampled and
    the code version tagged. An exception ends it FAILED, Ctrl-C or SIGTERM ends it KILLED, each with a tag
    saying why; success removes a `failure_reason` left by an earlier attempt. held: the run is leased to this
    process while it is open (a new run is claimed as it opens)."""
    with mlflow.start_run(log_system_metrics=True) as run:
        try:
            if held is not None:
                held.claim(run.info.run_id)
            mlflow.set_tag(CODE_VERSION_TAG, code_version())
            yield run
            _clear_failure(run.info.run_id)
        except (KeyboardInterrupt, Terminated) as exc:
            with contextlib.suppress(Exception):
                why = "terminated by SIGTERM" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
                mlflow.set_tag(FAILURE_TAG, why)
                mlflow.end_run("KILLED")
            raise
        except BaseException as exc:
            with contextlib.suppress(Exception):
                mlflow.set_tag(FAILURE_TAG, f"{type(exc).__name__}: {exc}"[:5000])
                step = getattr(exc, "step", None)
                if step is not None:
                    mlflow.set_tag(DIVERGED_TAG, str(step))
            raise
        finally:
            if held is not None:  # no renewal may race the run's end (it would set the status back)
                held.stop()


DIVERGED_TAG = "diverged_at_step"


def _clear_failure(run_id: str) -> None:
    """A run that failed before and now succeeded (resumed) is not failed: its old reason goes."""
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    for tag in (FAILURE_TAG, DIVERGED_TAG):
        if tag in tags:
            client.delete_tag(run_id, tag)


class RunLease:
    """This process's lease on the run it trains (cifar_mlflow.lease). `with RunLease():` claims the run
    `mlflow run` named (MLFLOW_RUN_ID: a fresh run or a resume) before any work; open_run(held) claims a run it
    creates. A run whose lease a live process holds is refused with RunBusy, before anything in it is changed.
    While held, a daemon thread renews the lease; on exit it is released, so the run can be resumed at once."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.holder: lease.Holder | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLease:
        if os.environ.get("MLFLOW_RUN_ID"):
            self.claim(os.environ["MLFLOW_RUN_ID"])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self.holder is not None and not self.lost:
            with contextlib.suppress(Exception):
                MlflowClient().set_tag(self.run_id, lease.TAG, self.holder.released().to_json())

    def claim(self, run_id: str) -> None:
        if self.run_id == run_id:
            return
        client = MlflowClient()
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(
                f"run {run_id} (MLFLOW_RUN_ID) cannot be read from {mlflow.get_tracking_uri()} "
                f"({_first_line(exc)[:160]})"
            ) from None
        n, holder = lease.latest(run.data.params, run.data.tags)
        now = time.time()
        if holder is not None and holder.alive(now):
            raise RunBusy(_busy(run_id, holder))
        mine = lease.this_process(now)
        key = f"{lease.PARAM_PREFIX}{n + 1}"
        try:  # insert-once: of two processes claiming n + 1, the store lets exactly one write it
            client.log_param(run_id, key, mine.to_json())
        except MlflowException:
            other = client.get_run(run_id).data.params.get(key)
            if other is None:  # not a lost race: the store itself failed
                raise
            raise RunBusy(_busy(run_id, lease.Holder.from_json(other))) from None
        client.set_tag(run_id, lease.TAG, mine.to_json())
        self.run_id, self.holder = run_id, mine
        self._thread = threading.Thread(target=self._beat, name="mlflow-run-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(lease.HEARTBEAT):
            with contextlib.suppress(Exception):  # a store that is down: the next beat tries again
                self.renew()

    def renew(self) -> None:
        """Extend the lease, unless another process has claimed the run since (then `lost`). A refused second
        `mlflow run --run-id` marks the run FAILED as it exits (MLflow's CLI does, not our code): the holder,
        which is still training it, sets it back to RUNNING."""
        client = MlflowClient()
        run = client.get_run(self.run_id)
        _, holder = lease.latest(run.data.params, run.data.tags)
        if holder is None or holder.id != self.holder.id:
            self.lost = True
            return
        client.set_tag(self.run_id, lease.TAG, self.holder.renewed(time.time()).to_json())
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


def _busy(run_id: str, holder: lease.Holder | None) -> str:
    who = holder.describe() if holder is not None else "another process"
    return (
        f"run {run_id} is being trained by {who}; this process stops without touching it: wait for that one "
        "to end, or resume after it stops"
    )


def fail_run_from_env(reason: str) -> None:
    """Bad input found before the run was opened: if `mlflow run` created one (MLFLOW_RUN_ID), end it FAILED
    with the reason, so no run is left RUNNING whoever started the process."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    with contextlib.suppress(Exception):
        client = MlflowClient()
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
        client.set_terminated(run_id, "FAILED")


def run_url(run: mlflow.ActiveRun) -> str:
    """Where to look at the run: the server's page, or the `mlflow ui` command for a local store."""
    uri = mlflow.get_tracking_uri()
    path = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{path}"


# ---------------------------------------------------------------------------------------------------------------
# Params, metrics, datasets, artifacts


def _as_param(value: Any) -> str:
    """How a value is logged: tuples (mean, std) as comma-separated numbers, everything else as str()."""
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _same(logged: str, value: Any) -> bool:
    """Is an already-logged string the same value? `mlflow run` logs -P values as typed ("1e-3"), we as parsed,
    and it logs a value that needs shell quoting quoted ("'/tmp/my data'"), as it puts it into the command."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(logged) == float(value)
        except ValueError:
            return False
    return _as_param(value) in (logged, _unquoted(logged))


def _unquoted(logged: str) -> str:
    try:
        words = shlex.split(logged)
    except ValueError:  # unbalanced quotes: not something shlex.quote wrote
        return logged
    return words[0] if len(words) == 1 else logged


def log_params(params: dict[str, Any]) -> None:
    """Log params, skipping those the run already holds with the same value (as `mlflow run` logs its -P values
    first, in its own spelling); a different value is an error naming the key."""
    run_id = mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    new: dict[str, str] = {}
    differ = []
    for key, value in params.items():
        if key in existing:
            if not _same(existing[key], value):
                differ.append(f"{key} (run: {existing[key]!r}, now: {value!r})")
            continue
        new[key] = _as_param(value)
    if differ:
        # Derived params (data/..., env/..., model/...) exist only once a process of ours ran in this run.
        resumed = any("/" in k and not k.startswith(lease.PARAM_PREFIX) for k in existing)
        if resumed:
            raise ConfigError(
                f"run {run_id} was logged with other parameters: {'; '.join(differ)}; resume it "
                "with the same parameters, or start a new run"
            )
        raise ConfigError(
            f"run {run_id}: `mlflow run` logged parameters that differ from those this process "
            f"received: {'; '.join(differ)}"
        )
    if new:
        mlflow.log_params(new)


def log_epoch(epoch: int, metrics: dict[str, float], once: bool = False) -> None:
    """once (a resumed run): skip the metrics the run holds at this step already (logged before it was killed)."""
    if once:
        client, run_id = MlflowClient(), mlflow.active_run().info.run_id
        metrics = {
            k: v for k, v in metrics.items() if all(m.step != epoch for m in client.get_metric_history(run_id, k))
        }
    if metrics:
        mlflow.log_metrics(metrics, step=epoch)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_dataset(dataset: data_mod.Dataset, split: data_mod.Split, context: str) -> None:
    """Record a split as a run input (name, content digest, context) without uploading the data."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    if dataset.name == "synthetic":
        source: Any = CodeDatasetSource({"generator": "cifar_mlflow.data.make_synthetic"})
    else:
        source = str(Path(dataset.source).resolve())
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path "can be interpreted in multiple
        # ways: LocalArtifactDatasetSource, LocalArtifactDatasetSource" -- the same class; nothing to act on.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        ds = mlflow.data.from_numpy(
            split.images, targets=split.labels, name=dataset.name, digest=data_mod.array_digest(split), source=source
        )
    for attempt in range(3):
        try:
            mlflow.log_input(ds, context=context)
            return
        except MlflowException as exc:
            # Two runs logging the same dataset at once race inside the server's check-then-insert
            # ("UNIQUE constraint failed: datasets..."); a moment later the dataset exists and is simply linked.
            if attempt == 2 or "UNIQUE constraint" not in str(exc):
                raise
            time.sleep(0.5 * (attempt + 1))


def log_figure(fig: Figure, artifact_file: str) -> None:
    mlflow.log_figure(fig, artifact_file)


def _figure_rgb(fig: Figure) -> np.ndarray:
    """A figure as the uint8 RGB array that mlflow's log_image takes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_dict(obj: dict[str, Any], artifact_file: str) -> None:
    mlflow.log_dict(obj, artifact_file)


# ---------------------------------------------------------------------------------------------------------------
# Models and registry


class _PyfuncClassifier:
    """What `mlflow.pyfunc.load_model` returns for our models: float32 images in [0, 1] of shape (N, 3, 32, 32)
    in, class probabilities (N, num_classes) out. Class names are in the model's metadata.

    The model checks its own input (models.as_images): its signature is marked as one MLflow does not enforce,
    so `mlflow models serve` hands over the request's JSON values as parsed (not cast to float32 first, which
    would turn true into 1.0, "0.5" into 0.5 and null into NaN) and skips its deep copy of the request."""

    def __init__(self, model: Any, spec: models.ModelSpec) -> None:
        self.model, self.spec = model, spec

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        try:
            x = models.as_images(model_input, max_images=models.MAX_REQUEST_IMAGES)
        except ModelError as exc:
            if isinstance(model_input, list):
                # The scoring server quotes the whole input in its error message: a refused request is emptied
                # first, so the 400 answers at once with the reason instead of megabytes of numbers.
                model_input.clear()
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return models.predict_proba(self.model, torch.from_numpy(x)).numpy()


def _load_pyfunc(data_path: str) -> _PyfuncClassifier:
    """MLflow's loader_module hook: rebuild the model from its files (safetensors, no pickle)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, spec = models.load_model_files(Path(data_path), device=device)
    return _PyfuncClassifier(model.to(memory_format=torch.channels_last), spec)


def _signature(num_classes: int) -> ModelSignature:
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 32, 32))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )
    # Saved in MLmodel as `is_signature_from_type_hint: true`: MLflow then leaves input checking to the model
    # (_PyfuncClassifier.predict), as it does for models whose signature comes from their code's type hints.
    signature._is_signature_from_type_hint = True
    return signature


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str
    is_champion: bool


def log_and_register_model(
    model: Any,
    spec: models.ModelSpec,
    input_example: np.ndarray,
    registered_name: str,
    test_accuracy: float,
    epochs: int,
) -> RegisteredVersion:
    """Log the model to the active run, register it as a new version tagged with its test accuracy, and move the
    `champion` alias to it if it beats the current champion (or there is none). A run that registered a version
    already (killed right after registering, then resumed) keeps that version: none is added."""
    run = mlflow.active_run()
    mv = version_of_run(registered_name, run.info.run_id)
    if mv is None:
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / "model_files"
            models.save_model_files(model, spec, files)
            # No code_paths: the loader module is imported from the environment, never from the artifact store.
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                loader_module=__name__,
                data_path=str(files),
                signature=_signature(spec.num_classes),
                input_example=input_example,
                pip_requirements=[f"{p}=={metadata.version(p)}" for p in _SERVING_PACKAGES],
                metadata={
                    "class_names": list(spec.class_names),
                    "arch": spec.arch,
                    "input": "float32 (N, 3, 32, 32) in [0, 1]",
                    "output": "class probabilities (N, C)",
                },
            )
        tags = {"test_accuracy": f"{test_accuracy:.6f}", "epochs": str(epochs), "run_id": run.info.run_id}
        mv = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    return _settle_and_tag(registered_name, str(mv.version), run.info.run_id)


def finish_registration(registered_name: str, run_id: str) -> RegisteredVersion:
    """A run killed right after registering its version: settle `champion` and tag the run, registering
    nothing new."""
    return _settle_and_tag(registered_name, str(version_of_run(registered_name, run_id).version), run_id)


def _settle_and_tag(registered_name: str, version: str, run_id: str) -> RegisteredVersion:
    is_champion = settle_champion(registered_name) == version
    MlflowClient().log_batch(
        run_id,
        tags=[
            RunTag(k, v)
            for k, v in {
                "registered_model_name": registered_name,
                "registered_model_version": version,
                "champion": str(is_champion).lower(),
            }.items()
        ],
    )
    return RegisteredVersion(registered_name, version, f"models:/{registered_name}/{version}", is_champion)


def _quoted(value: str) -> str:
    """A string literal for MLflow's search filters, which have no escape: single quotes, or double quotes
    around a value holding a single quote."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ModelError(f"{value!r} holds both quote characters, which MLflow's search filters cannot express")


def _versions(client: MlflowClient, name: str) -> list[Any]:
    return client.search_model_versions(f"name={_quoted(name)}")


def version_of_run(name: str, run_id: str) -> Any:
    """The version of `name` registered from this run (tagged run_id), or None."""
    try:
        return next((v for v in _versions(MlflowClient(), name) if v.tags.get("run_id") == run_id), None)
    except MlflowException:
        return None


def _best_version(client: MlflowClient, name: str) -> str | None:
    """The version with the highest test_accuracy tag; ties go to the earlier version (it got there first)."""
    scored = [
        (float(v.tags["test_accuracy"]), -int(v.version), str(v.version))
        for v in _versions(client, name)
        if "test_accuracy" in v.tags
    ]
    return max(scored)[2] if scored else None


def settle_champion(name: str, attempts: int = 10) -> str | None:
    """Point `champion` at the best version, race-safe without a compare-and-set: write the best of a fresh
    read, read again, and repeat until the alias and the best agree. Two runs registering at once both end
    with the alias on the better one, whichever writes last."""
    client = MlflowClient()
    for _ in range(attempts):
        best = _best_version(client, name)
        if best is None:
            return None
        current = current_champion(name)
        if current is None or str(current.version) != best:
            client.set_registered_model_alias(name, CHAMPION, best)
        time.sleep(0.05)
        current = current_champion(name)
        if current is not None and str(current.version) == _best_version(client, name):
            return str(current.version)
    return best


def current_champion(name: str) -> Any:
    """The model version holding the champion alias, or None (no such model, or no alias yet)."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


MAX_MLMODEL_BYTES = 1 << 20  # MLflow writes a few KB; a bigger file is not parsed


def _model_files_dir(model_uri: str, dst: Path) -> Path:
    """Download the model's folder and find its data files through MLmodel (YAML, read with PyYAML's safe
    loader). Nothing in the folder is imported or executed; a `data` path leading out of the folder is refused."""
    if not sys.stderr.isatty():  # MLflow's per-file download bar floods logs and CI output
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))).resolve()
    except MlflowException as exc:
        raise ModelError(f"cannot load {model_uri}: {exc.message.splitlines()[0]}") from None
    try:
        if (local / "MLmodel").stat().st_size > MAX_MLMODEL_BYTES:
            raise ModelError(f"{model_uri}: its MLmodel file is over {MAX_MLMODEL_BYTES:,} bytes; not parsed")
        files = (local / str(Model.load(str(local)).flavors["python_function"]["data"])).resolve()
    except (OSError, KeyError, TypeError, ValueError, MlflowException) as exc:
        raise ModelError(f"{model_uri}: not a cifar-mlflow model ({exc})") from None
    if not files.is_relative_to(local):
        raise ModelError(f"{model_uri}: its MLmodel points the model's data outside the model's folder; refused")
    return files


def load_torch_model(model_uri: str, device: str = "cpu") -> tuple[Any, models.ModelSpec]:
    """A registered or logged model as a real torch.nn.Module (eval mode), rebuilt from its logged config with
    safetensors weights: hooks (GradCAM) work on it. Reads MLmodel, model_config.json and weights.safetensors;
    imports nothing from the model, whatever its MLmodel names, and unpickles nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        return models.load_model_files(_model_files_dir(model_uri, Path(tmp)), device=device)


# ---------------------------------------------------------------------------------------------------------------
# Finding a model and its training run (analysis)


@dataclass(frozen=True)
class ModelRef:
    """What a model URI points at: the registered name and version (None for runs:/ and logged-model URIs),
    and the run that trained it."""

    uri: str
    name: str | None
    version: str | None
    run_id: str


def _describe_versions(client: MlflowClient, name: str) -> str:
    versions = sorted(int(v.version) for v in _versions(client, name))
    aliases = client.get_registered_model(name).aliases
    alias_text = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    return f"versions: {', '.join(map(str, versions)) or 'none'}; aliases: {alias_text}"


def resolve_model(uri: str) -> ModelRef:
    """Resolve models:/name/version, models:/name@alias, models:/<logged model id> or runs:/<run id>/<path>.
    An unknown name, version or alias is a one-line ModelError naming what exists."""
    client = MlflowClient()
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/") :].split("/", 1)[0]
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ModelError(f"model_uri {uri!r}: no run {run_id!r} in this tracking store") from None
        return ModelRef(uri, None, None, run_id)
    rest = uri[len("models:/") :]
    name, sep, ref = rest.partition("@") if "@" in rest else rest.partition("/")
    if not sep:  # models:/<logged model id> (MLflow 3)
        try:
            return ModelRef(uri, None, None, mlflow.get_logged_model(name).source_run_id)
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
    return ModelRef(uri, name, str(mv.version), mv.run_id)


def run_params(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.params


@contextlib.contextmanager
def analysis_run(ref: ModelRef) -> Iterator[mlflow.ActiveRun]:
    """Open the analysis run (or the one `mlflow run` created), tagged with the model it analyses; the model
    version is tagged back with this run's id, so the lineage reads both ways."""
    with open_run() as run:
        mlflow.set_tags(
            {
                "model_uri": ref.uri,
                "training_run_id": ref.run_id,
                **({"model_name": ref.name, "model_version": ref.version} if ref.name else {}),
            }
        )
        if ref.name:
            MlflowClient().set_model_version_tag(ref.name, ref.version, "analysis_run_id", run.info.run_id)
        yield run


def log_metrics(metrics: dict[str, float]) -> None:
    mlflow.log_metrics(metrics)


def log_table(columns: dict[str, list[Any]], artifact_file: str) -> None:
    """A table the MLflow UI can sort and filter (Artifacts view / evaluation tables)."""
    mlflow.log_table(data=columns, artifact_file=artifact_file)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, per-epoch reporting and resume

CHECKPOINTS = "checkpoints"
MANIFEST = f"{CHECKPOINTS}/latest.json"
SLOT_FILE = "checkpoint.pt"


def _sha256(path: Path) -> str:
    return data_mod.file_digest(path, "sha256")


def _slot_path(epoch: int) -> str:
    """Odd epochs in slot-a, even in slot-b."""
    return f"{CHECKPOINTS}/slot-{'a' if epoch % 2 else 'b'}/{SLOT_FILE}"


def log_checkpoint(
    run_id: str, state: dict[str, Any], epoch: int, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Two slots used in turn, then a manifest naming the slot just finished with its SHA-256, and the other
    slot's entry (`previous`) as the fallback. A crash while uploading a slot leaves the manifest on the other,
    complete one; the store holds two checkpoints, not one per epoch. Returns the manifest's entry."""
    client = MlflowClient()
    entry = {"epoch": epoch, "path": _slot_path(epoch)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SLOT_FILE
        try:
            checkpoint.save(state, path)
            entry["sha256"] = _sha256(path)
            client.log_artifact(run_id, str(path), entry["path"].rsplit("/", 1)[0])
            before = {k: previous[k] for k in entry} if previous and previous.get("epoch") == epoch - 1 else None
            manifest = {**entry, "previous": before}
            client.log_dict(run_id, manifest, MANIFEST)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError of its writer
            raise StorageError(
                f"cannot write the checkpoint of epoch {epoch} ({_storage_reason(exc)}); free "
                f"space, then resume the run (mlflow run --run-id {run_id})"
            ) from None
    return entry


def _storage_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or _first_line(exc)
    return "the write failed: is the disk full?"  # torch's zip writer reports no errno ("unexpected pos ...")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _entry_problem(entry: Any) -> str | None:
    """Why a manifest entry is not one log_checkpoint writes (so it is not followed), or None."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object"
    epoch = entry.get("epoch")
    if type(epoch) is not int or epoch < 1:
        return f"epoch {epoch!r:.40} is not an integer >= 1"
    if entry.get("path") != _slot_path(epoch):
        return f"path {str(entry.get('path'))[:160]!r} is not {_slot_path(epoch)}, where epoch {epoch} belongs"
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        return "it has no SHA-256 of 64 hex digits"
    return None


def read_manifest(run_id: str) -> dict[str, Any] | None:
    """The run's checkpoint manifest, checked, or None if the run has no checkpoints."""
    client = MlflowClient()
    if not client.list_artifacts(run_id, CHECKPOINTS):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(client.download_artifacts(run_id, MANIFEST, tmp))
            manifest = json.loads(path.read_text()) if path.stat().st_size < 65536 else "a file over 64 KB"
        except (MlflowException, OSError, ValueError, RecursionError) as exc:
            raise ModelError(
                f"run {run_id}: its checkpoint manifest {MANIFEST} is unreadable ({_first_line(exc)})"
            ) from None
    problem = _entry_problem(manifest)
    if problem:
        raise ModelError(
            f"run {run_id}: its checkpoint manifest {MANIFEST} is malformed ({problem}); it was not "
            "followed. Restore it, or start a new run"
        )
    return manifest


def _verified(client: MlflowClient, run_id: str, entry: dict[str, Any], tmp: str) -> dict[str, Any]:
    """The checkpoint an entry names: its SHA-256 checked, loaded safely, holding the epoch the entry says."""
    try:
        path = Path(client.download_artifacts(run_id, entry["path"], tmp))
    except (MlflowException, OSError) as exc:
        raise ModelError(f"run {run_id}: {entry['path']} is unreadable ({_first_line(exc)})") from None
    if _sha256(path) != entry["sha256"]:
        raise ModelError(f"run {run_id}: {entry['path']} does not match the SHA-256 in {MANIFEST}")
    state = checkpoint.load(path, name=f"run {run_id}: {entry['path']}")
    if state["epoch"] != entry["epoch"]:
        raise ModelError(
            f"run {run_id}: {entry['path']} holds epoch {state['epoch']}, the manifest says {entry['epoch']}"
        )
    return state


def load_latest_checkpoint(run_id: str) -> dict[str, Any] | None:
    """The run's last complete checkpoint, verified against the manifest, or None if it has none. If the latest
    slot fails verification (truncated, altered), the other slot's checkpoint of the epoch before is used, when
    the manifest vouches for it."""
    manifest = read_manifest(run_id)
    if manifest is None:
        return None
    client = MlflowClient()
    previous = manifest.get("previous")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return _verified(client, run_id, manifest, tmp)
        except ModelError as exc:
            if _entry_problem(previous) is not None or previous["epoch"] != manifest["epoch"] - 1:
                raise
            latest_error = exc
        state = _verified(client, run_id, previous, tmp)
    print(f"{latest_error}; resuming from the other slot, {previous['path']} (epoch {previous['epoch']})")
    return state


class EpochReporter:
    """on_epoch_end for engine.fit: reports each finished epoch from a background thread, in order, checkpoint
    first and then the epoch's metrics, so MLflow never shows an epoch that has no checkpoint and training never
    waits for the store (a slow or restarting server only delays the reports). close() waits for all of them
    and raises the first error.

    lease: this process's RunLease; a checkpoint is written only while it holds. logged_through: the last epoch
    whose metrics the run holds already (a resume from the other slot trains that epoch again): its metrics and
    images are not logged twice."""

    def __init__(self, run_id: str, lease: RunLease | None = None, logged_through: int = 0) -> None:
        self.run_id, self.lease, self.logged_through = run_id, lease, logged_through
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-epoch-reporter")
        self._pending: list[Future] = []
        self._previous: dict[str, Any] | None = None  # the manifest entry of the epoch before
        self.cpu_seconds = 0.0  # CPU time the reporting thread has spent (what tracking takes from training)

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
            if self.lease is not None:
                self.lease.check()
            if self._previous is None and epoch > 1:  # the first epoch this process reports, on a resume
                self._previous = _entry_of(self.run_id, epoch - 1)
            self._previous = log_checkpoint(self.run_id, state, epoch, self._previous)
            if epoch <= self.logged_through:
                return
            client = MlflowClient()
            now = int(time.time() * 1000)
            client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()])
            for key, build in images.items():
                client.log_image(self.run_id, _figure_rgb(build()), key=key, step=epoch)
        finally:
            self.cpu_seconds += time.thread_time() - start

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


def _entry_of(run_id: str, epoch: int) -> dict[str, Any] | None:
    """The manifest's entry for `epoch` (its latest, or the other slot after a fallback), or None."""
    with contextlib.suppress(ModelError):
        manifest = read_manifest(run_id)
        for entry in (manifest, (manifest or {}).get("previous")):
            if isinstance(entry, dict) and entry.get("epoch") == epoch and _entry_problem(entry) is None:
                return entry
    return None


def logged_through(run_id: str, key: str = "test/accuracy") -> int:
    """The last epoch whose metrics the run holds (0: none)."""
    return max((m.step for m in MlflowClient().get_metric_history(run_id, key)), default=0)


def backfill_epochs(run_id: str, history: list[dict[str, float]]) -> None:
    """After a crash between a checkpoint and its metrics: log the metrics of checkpointed epochs that the run
    lacks, so that its history holds every epoch exactly once."""
    client = MlflowClient()
    missing = []
    now = int(time.time() * 1000)
    for key in history[0] if history else ():
        logged = {m.step for m in client.get_metric_history(run_id, key)}
        missing += [
            Metric(key, float(h[key]), now, epoch) for epoch, h in enumerate(history, start=1) if epoch not in logged
        ]
    if missing:
        client.log_batch(run_id, metrics=missing)


# ---------------------------------------------------------------------------------------------------------------
# Multistep workflows (the `pipeline` entry point)


def project_dir() -> Path:
    """The MLflow Project this package belongs to (the folder holding MLproject)."""
    root = _PACKAGE_DIR.parent
    if not (root / "MLproject").is_file():
        raise ConfigError(
            f"the pipeline runs the MLflow Project's entry points, but {root} holds no MLproject "
            "file; run it from a checkout of cifar-mlflow"
        )
    return root


def finished_step(entry_point: str, params: dict[str, Any], needs: Callable[[Any], bool]) -> Any:
    """The newest FINISHED run of this experiment made by `entry_point` of this project with the same code
    version and the same value for every one of `params`, for which needs(run) holds; else None.
    (MLflow's multistep example compares the git commit; code_version also sees uncommitted edits.)"""
    client = MlflowClient()
    experiment_id = mlflow.active_run().info.experiment_id
    query = (
        f"attributes.status = 'FINISHED' and tags.`mlflow.project.entryPoint` = '{entry_point}' "
        f"and tags.{CODE_VERSION_TAG} = '{code_version()}'"
    )
    for run in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"]):
        logged = run.data.params
        if all(k in logged and _same(logged[k], v) for k, v in params.items()) and needs(run):
            return run
    return None


def run_step(entry_point: str, params: dict[str, Any]) -> Any:
    """Run an entry point of this project as a child of the active run (`mlflow run` semantics: a fresh process
    and a run of its own, tagged with mlflow.parentRunId) and return the finished run. A failed step is a
    TrackingError naming the run and the reason it recorded."""
    from mlflow.projects import run as run_project

    parent = mlflow.active_run().info
    try:
        submitted = run_project(
            str(project_dir()),
            entry_point=entry_point,
            env_manager="local",
            parameters={k: _as_param(v) for k, v in params.items()},
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
    client = MlflowClient()
    run = client.get_run(submitted.run_id)
    if run.info.status == "RUNNING":  # the step died before it could close its run
        client.set_terminated(submitted.run_id, "FINISHED" if ok else "FAILED")
        run = client.get_run(submitted.run_id)
    if not ok or run.info.status != "FINISHED":
        why = run.data.tags.get(FAILURE_TAG, "see its log above")
        raise TrackingError(f"pipeline step {entry_point!r} (run {submitted.run_id}) ended {run.info.status}: {why}")
    return run
