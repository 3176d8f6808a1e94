"""The model as MLflow stores it, loadable by stock MLflow where cifar_mlflow is not installed:

    MLmodel                          flavors `pytorch` and `python_function`; metadata: class_names, arch
    artifacts/pytorch/data/model.pt2       the network: a torch.export program (graph as JSON, raw tensor bytes)
    artifacts/pytorch/data/model_config.json   architecture, classes, normalisation (to rebuild it as nn.Module)
    artifacts/pytorch/MLmodel        the same network as a model of its own (what the pyfunc loads)
    served_model.py                  the pyfunc's code (tracking.served_model): input checks, probabilities

- `mlflow.pytorch.load_model(uri)`: the exported network as a torch.fx GraphModule: float32 (N, 3, 32, 32) in
  [0, 1] in, logits (N, C) out (normalisation inside); softmax over dim 1 gives the pyfunc's probabilities.
- `mlflow.pyfunc.load_model(uri)` / `mlflow models serve`: served_model.py, a list of images in, probabilities out.
- `load_torch_model(uri)` (analysis, GradCAM): a real CifarResNet rebuilt from model_config.json, with the
  weights of model.pt2 (the only copy) loaded into it; hooks fire on it.

Loading model.pt2 here (load_torch_model, the pyfunc) unpickles nothing but tensor data: MLflow's check of the
archive is forced on (served_model.load_network: every record is JSON, text, raw tensor bytes, or the example input
that torch's weights_only unpickler accepts), then torch.export.load rebuilds the graph from JSON. Stock
mlflow.pytorch.load_model runs that check only with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (docs/security.md).
Models registered before this layout (a pyfunc whose loader is `_load_pyfunc` below, with model_config.json +
weights.safetensors) still load through the same functions."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from cifar_mlflow import models
from cifar_mlflow.errors import ModelError, first_line
from cifar_mlflow.tracking import served_model
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.training import stop

MODEL_NAME_IN_RUN = "model"
# What the served model imports (served_model.py and torch.export's graph: no torchvision), pinned as trained.
SERVING_PACKAGES = ("mlflow", "torch", "numpy")
PYTORCH_DATA = f"artifacts/{served_model.PYTORCH_ARTIFACT}/data"  # the pytorch flavor's model_data
EXPORTED_FILE = "model.pt2"
PICKLED_FILE = "model.pth"  # what mlflow.pytorch writes in the pickle format: never loaded here
MAX_MLMODEL_BYTES = 1 << 20  # MLflow writes a few KB; a bigger file is not parsed


def log_model(log: RunLogger, model: Any, spec: models.ModelSpec, input_example: np.ndarray, step: int) -> str:
    """Log the trained network to the run as an MLflow 3 logged model and return its id. `step` is the epoch it
    was trained to: the run's metrics at that step (test/accuracy, ...) are linked to the model, each with the
    dataset it was measured on, for the experiment's Models tab and mlflow.search_logged_models.

    A run that logged its model already (killed before registering it, then resumed) reuses it. MLflow's
    Model.log is not used: its own copy of the step's metrics carries no dataset, and makes a second, dataset-
    linked copy fail on the store's unique key (MLflow 3.17)."""
    client = log.client
    existing = _logged_model_of(log)
    if existing is not None:
        log.link_metrics(existing, step)
        return existing
    run = log.run()
    logged = client.create_logged_model(
        log.experiment_id,
        name=MODEL_NAME_IN_RUN,
        source_run_id=log.run_id,
        params=dict(run.data.params),
        model_type="image-classifier",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            mlflow_model = Model(
                artifact_path=logged.artifact_location,
                run_id=log.run_id,
                model_uuid=logged.model_id,
                model_id=logged.model_id,
            )
            save_model(str(folder), mlflow_model, model, spec, input_example)
            stop.check()  # a stop asked for while exporting (registry.log_and_register_model defers it)
            client.log_model_artifacts(logged.model_id, str(folder))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        with contextlib.suppress(MlflowException):
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(log.run_id, [LoggedModelOutput(logged.model_id, step=step)])
    log.link_metrics(logged.model_id, step)
    return str(logged.model_id)


def _logged_model_of(log: RunLogger) -> str | None:
    """The READY model this run logged already (its outputs list only finished ones), or None."""
    outputs = log.run().outputs
    for output in (outputs.model_outputs if outputs else None) or []:
        with contextlib.suppress(MlflowException):
            logged = log.client.get_logged_model(output.model_id)
            if logged.name == MODEL_NAME_IN_RUN and logged.status == LoggedModelStatus.READY:
                return str(logged.model_id)
    return None


def save_model(path: str, mlflow_model: Model, network: Any, spec: models.ModelSpec, input_example: np.ndarray) -> None:
    """Write the model folder (module docstring) at `path`. The network is exported from a CPU copy in fp32, so
    that it loads on any host (its graph holds no device)."""
    import torch

    cpu = models.with_weights(spec, {k: v.detach().cpu() for k, v in network.state_dict().items()}, Path("trained"))
    example = np.ascontiguousarray(input_example, dtype=np.float32)
    requirements = [f"{p}=={metadata.version(p)}" for p in SERVING_PACKAGES]
    described = {
        "class_names": list(spec.class_names),
        "arch": spec.arch,
        "input": served_model.INPUT,
        "pytorch_output": "logits (N, C): softmax over dim 1 gives the class probabilities",
        "pyfunc_output": "class probabilities (N, C)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        network_dir = Path(tmp) / served_model.PYTORCH_ARTIFACT
        with _quiet_mlflow():
            mlflow.pytorch.save_model(
                cpu,
                str(network_dir),
                serialization_format="pt2",
                input_example=example,
                signature=ModelSignature(
                    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *served_model.IMAGE_SHAPE))]),
                    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))]),
                ),
                pip_requirements=requirements,
                metadata=described,
            )
        models.write_spec(spec, network_dir / "data")
        mlflow_model.add_flavor("pytorch", model_data=PYTORCH_DATA, pytorch_version=str(torch.__version__), code=None)
        with _quiet_mlflow():
            mlflow.pyfunc.save_model(
                path,
                python_model=served_model.__file__,
                artifacts={served_model.PYTORCH_ARTIFACT: str(network_dir)},
                mlflow_model=mlflow_model,
                input_example=example.tolist(),
                pip_requirements=requirements,
                metadata=described,
            )


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's notes while saving the model: predict's union type hint "is inferred as AnyType" (intended:
    served_model checks the values) and the like; expected here, and printed on every training run otherwise."""
    import logging

    loggers = [logging.getLogger(name) for name in ("mlflow.models.signature", "mlflow.types.type_hints")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --- loading -----------------------------------------------------------------------------------------------------


def load_torch_model(model_uri: str, device: str = "cpu") -> tuple[Any, models.ModelSpec]:
    """A registered or logged model as a real torch.nn.Module (eval mode): a CifarResNet rebuilt from the model's
    config with its weights, so that hooks (GradCAM) work on it. Reads MLmodel (YAML), the config (JSON) and the
    weights (model.pt2 after MLflow's pickle-free check, or weights.safetensors of older models); imports nothing
    the model names, and unpickles nothing but tensor data."""
    with tempfile.TemporaryDirectory() as tmp:
        local, flavors = _download(model_uri, Path(tmp))
        torch_flavor = flavors.get("pytorch")
        if isinstance(torch_flavor, dict):
            return _from_exported(model_uri, local, torch_flavor, device)
        return models.load_model_files(_legacy_files_dir(model_uri, local, flavors), device=device)


def _download(model_uri: str, dst: Path) -> tuple[Path, dict]:
    if not sys.stderr.isatty():  # MLflow's per-file download bar floods logs and CI output
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))).resolve()
    except MlflowException as exc:
        raise ModelError(f"cannot load {model_uri}: {exc.message.splitlines()[0]}") from None
    if not (local / "MLmodel").is_file():
        raise ModelError(f"{model_uri}: not a cifar-mlflow model (it has no MLmodel file: not an MLflow model)")
    try:
        if (local / "MLmodel").stat().st_size > MAX_MLMODEL_BYTES:
            raise ModelError(f"{model_uri}: its MLmodel file is over {MAX_MLMODEL_BYTES:,} bytes; not parsed")
        flavors = Model.load(str(local)).flavors
    except (OSError, TypeError, ValueError, MlflowException) as exc:
        raise ModelError(f"{model_uri}: not a cifar-mlflow model (its MLmodel cannot be read: {exc})") from None
    return local, flavors if isinstance(flavors, dict) else {}


def _inside(model_uri: str, local: Path, relative: object, what: str) -> Path:
    if not isinstance(relative, str):
        raise ModelError(f"{model_uri}: not a cifar-mlflow model (its MLmodel names no {what})")
    path = (local / relative).resolve()
    if not path.is_relative_to(local):
        raise ModelError(f"{model_uri}: its MLmodel points the model's data outside the model's folder; refused")
    return path


def _from_exported(model_uri: str, local: Path, flavor: dict, device: str) -> tuple[Any, models.ModelSpec]:
    import torch

    data = _inside(model_uri, local, flavor.get("model_data"), "pytorch model_data folder")
    if (data / PICKLED_FILE).exists() or not (data / EXPORTED_FILE).is_file():
        raise ModelError(
            f"{model_uri}: not a cifar-mlflow model (its pytorch flavor holds no {EXPORTED_FILE}; a pickled "
            f"{PICKLED_FILE} is never loaded here)"
        )
    if not (data / models.CONFIG_FILE).is_file():
        raise ModelError(f"{model_uri}: not a cifar-mlflow model (its pytorch flavor holds no {models.CONFIG_FILE})")
    spec = models.read_spec(data)
    try:
        exported = served_model.load_network(str(local))  # MLflow's pickle-free check of the archive, forced on
    except (MlflowException, RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"{model_uri}: {EXPORTED_FILE} not loaded ({first_line(exc)})") from None
    state = {k: v.detach().clone() for k, v in exported.state_dict().items()}
    model = models.with_weights(spec, state, data / EXPORTED_FILE, device=torch.device(device))
    return model, spec


def _legacy_files_dir(model_uri: str, local: Path, flavors: dict) -> Path:
    """Models registered before the pytorch flavor: the python_function flavor's data folder holds
    model_config.json and weights.safetensors."""
    pyfunc = flavors.get("python_function")
    data = pyfunc.get("data") if isinstance(pyfunc, dict) else None
    if not isinstance(data, str):
        found = ", ".join(sorted(map(str, flavors))) if flavors else "none"
        raise ModelError(
            f"{model_uri}: not a cifar-mlflow model (it has neither a pytorch flavor holding {EXPORTED_FILE} and "
            f"{models.CONFIG_FILE} nor, as older cifar-mlflow models, a python_function data folder holding "
            f"{models.CONFIG_FILE} and {models.WEIGHTS_FILE}; its flavors: {found})"
        )
    files = _inside(model_uri, local, data, "python_function data folder")
    if not (files / models.CONFIG_FILE).is_file():
        loader = pyfunc.get("loader_module") if isinstance(pyfunc, dict) else None
        raise ModelError(
            f"{model_uri}: not a cifar-mlflow model (its data {str(data)[:80]!r} holds no {models.CONFIG_FILE}; "
            f"it is loaded by {str(loader)[:80]})"
        )
    return files


class _PyfuncClassifier:
    """What `mlflow.pyfunc.load_model` returns for models registered before the pytorch flavor (their MLmodel
    names this module as loader): images in, class probabilities out, as served_model.CifarClassifier."""

    def __init__(self, model: Any, device: Any) -> None:
        self.model, self.device = model, device

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        try:
            x = served_model.as_images(model_input, max_images=served_model.MAX_REQUEST_IMAGES)
        except served_model.InvalidImages as exc:
            if isinstance(model_input, list):
                model_input.clear()  # the scoring server quotes the request in its error message
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return served_model.probabilities(self.model, x, self.device)


def _load_pyfunc(data_path: str) -> _PyfuncClassifier:
    """MLflow's loader_module hook for models registered before the pytorch flavor (safetensors, no pickle)."""
    import torch

    device = served_model.prediction_device()
    model, _ = models.load_model_files(Path(data_path), device=device)
    return _PyfuncClassifier(model.to(memory_format=torch.channels_last), device)
