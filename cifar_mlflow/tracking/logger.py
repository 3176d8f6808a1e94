"""One object per run: `RunLogger` writes params, metrics, tags, datasets and artifacts to the run it is bound to
(through MlflowClient, never MLflow's global "active run"). Processes that must not log (torchrun ranks > 0) hold
none (jobs/train.py)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from cifar_mlflow.errors import ConfigError
from cifar_mlflow.tracking import lease_records
from cifar_mlflow.tracking.params import as_param, same

if TYPE_CHECKING:  # a served model needs no matplotlib
    from matplotlib.figure import Figure

    from cifar_mlflow import data


ENV_ON_RESUME = "resumed_env"  # tag prefix: what the environment was when a resume ran in another one
PARAMS_PER_BATCH = 100  # the most params MLflow's log_batch takes in one call


class RunLogger:
    """Bound to one run id; every call goes to that run, whatever run another thread or library has active."""

    def __init__(self, run_id: str, experiment_id: str, client: MlflowClient | None = None) -> None:
        self.run_id, self.experiment_id = run_id, experiment_id
        # The run's one client: every call for the run goes through it (checkpoints, registry, lineage and the
        # reporter's thread take it from here). Made here unless the run's RunLease made it first (open_run).
        self.client = client or MlflowClient()
        # metric-name prefix -> (dataset name, digest) it is measured on (measured_on); MLflow shows the dataset
        # beside the metric and carries it to the logged model
        self.datasets: dict[str, tuple[str, str]] = {}
        self.model_id: str | None = None  # metrics logged after set_model are the logged model's too

    def measured_on(self, prefix: str, dataset: data.Dataset, split: data.Split) -> None:
        """Metrics whose names start with prefix ("test/") are logged as measured on this split."""
        from cifar_mlflow import data as data_mod

        self.datasets[prefix] = (dataset.name, data_mod.array_digest(split))

    def run(self) -> Any:
        """The run as the store holds it now (params, tags, status)."""
        return self.client.get_run(self.run_id)

    def status(self) -> str:
        return str(self.run().info.status)

    def set_status(self, value: str) -> None:
        """RUNNING while any process works for the run; FINISHED (with an end time) when its work is done."""
        if value == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, value)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params, skipping those the run already holds with the same value (as `mlflow run` logs its -P
        values first, in its own spelling); a different value is an error naming the key."""
        existing = self.run().data.params
        new: dict[str, str] = {}
        differ = []
        for key, value in params.items():
            if key in existing:
                if not same(existing[key], value):
                    differ.append(f"{key} (run: {existing[key]!r}, now: {value!r})")
                continue
            new[key] = as_param(value)
        if differ:
            # Derived params (data/..., env/..., model/...) exist only once a process of ours ran in this run.
            resumed = any("/" in k and not k.startswith(lease_records.PARAM_PREFIX) for k in existing)
            if resumed:
                raise ConfigError(
                    f"run {self.run_id} was logged with other parameters: {'; '.join(differ)}; resume it "
                    "with the same parameters, or start a new run"
                )
            raise ConfigError(
                f"run {self.run_id}: `mlflow run` logged parameters that differ from those this process "
                f"received: {'; '.join(differ)}"
            )
        items = [Param(k, v) for k, v in new.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + PARAMS_PER_BATCH])

    def log_run_params(self, params: dict[str, Any]) -> None:
        """The run's params; on a resumed run (an earlier process of ours logged its env/*) the recipe and the data
        must be the same (one line naming what differs), while the environment may have changed: another machine,
        device or library version after a crash is a resume, not another run. Its new values are tagged
        resumed_env/<key> (params cannot change) and printed."""
        logged = self.run().data.params
        env = {k: v for k, v in params.items() if k.startswith("env/")}
        if not any(k.startswith("env/") for k in logged):
            self.log_params(params)
            return
        self.log_params({k: v for k, v in params.items() if k not in env})
        changed = {k: v for k, v in env.items() if k not in logged or not same(logged[k], v)}
        if changed:
            self.set_tags({f"{ENV_ON_RESUME}/{k.removeprefix('env/')}": as_param(v) for k, v in changed.items()})
            was = ", ".join(f"{k} {logged.get(k, '-')} -> {as_param(v)}" for k, v in changed.items())
            print(f"note: resuming in another environment ({was}); tagged {ENV_ON_RESUME}/*")

    def log_metrics(self, metrics: dict[str, float], step: int = 0, once: bool = False) -> None:
        """once (a resumed run): skip the metrics the run holds at this step already (logged before it was
        killed)."""
        if once:
            metrics = {
                k: v
                for k, v in metrics.items()
                if all(m.step != step for m in self.client.get_metric_history(self.run_id, k))
            }
        now = int(time.time() * 1000)
        if metrics:
            self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step) for k, v in metrics.items()])

    def _metric(self, key: str, value: float, now: int, step: int, model_id: str | None = None) -> Metric:
        name, digest = next((d for prefix, d in self.datasets.items() if key.startswith(prefix)), (None, None))
        model_id = model_id or self.model_id
        return Metric(key, float(value), now, step, model_id=model_id, dataset_name=name, dataset_digest=digest)

    def link_metrics(self, model_id: str, step: int) -> None:
        """Link the run's metrics at `step` to a logged model, each with the dataset it was measured on
        (measured_on). The same points (key, step, timestamp, value): the run's history gains none. Points linked
        already (a resumed run) are skipped."""
        linked = {(m.key, m.step, m.timestamp) for m in self.client.get_logged_model(model_id).metrics or []}
        points = [
            m
            for key in self.run().data.metrics
            for m in self.client.get_metric_history(self.run_id, key)
            if m.step == step and (m.key, m.step, m.timestamp) not in linked
        ]
        if points:
            metrics = [self._metric(m.key, m.value, m.timestamp, m.step, model_id) for m in points]
            self.client.log_batch(self.run_id, metrics=metrics)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(self, dataset: data.Dataset, split: data.Split, context: str) -> None:
        """Record a split as a run input (name, content digest, context) without uploading the data."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.numpy_dataset import from_numpy

        from cifar_mlflow import data as data_mod

        if dataset.name == "synthetic":
            source: Any = CodeDatasetSource({"generator": "cifar_mlflow.data.make_synthetic"})
        else:
            source = str(Path(dataset.source).resolve())
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that a path "can be interpreted in multiple
            # ways: LocalArtifactDatasetSource, LocalArtifactDatasetSource" -- the same class; nothing to act on.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            ds = from_numpy(
                split.images,
                targets=split.labels,
                name=dataset.name,
                digest=data_mod.array_digest(split),
                source=source,
            )
        entry = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=[entry])
                return
            except MlflowException as exc:
                # Two runs logging the same dataset at once race inside the server's check-then-insert
                # ("UNIQUE constraint failed: datasets..."); a moment later the dataset exists and is simply linked.
                if attempt == 2 or "UNIQUE constraint" not in str(exc):
                    raise
                time.sleep(0.5 * (attempt + 1))

    def log_figure(self, fig: Figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)

    def log_image(self, build: Callable[[], Figure], key: str, step: int) -> None:
        """A figure as a step of an image series (the UI's slider over epochs)."""
        self.client.log_image(self.run_id, figure_rgb(build()), key=key, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_table(self, columns: dict[str, list[Any]], artifact_file: str) -> None:
        """A table the MLflow UI can sort and filter (Artifacts view / evaluation tables)."""
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)


def figure_rgb(fig: Figure) -> np.ndarray:
    """A figure as the uint8 RGB array that MLflow's log_image takes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
