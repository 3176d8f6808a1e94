"""The model as MLflow stores and serves it: a pyfunc whose files are `model_config.json` + `weights.safetensors`
(cifar_mlflow.models) and whose loader is `_load_pyfunc` below, imported from the installed package. No code is
shipped with the model, so serving it runs only the environment's code, and loading it as a torch.nn.Module
(`load_torch_model`, analysis) reads data files only. Neither unpickles anything."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import Schema, TensorSpec

from cifar_mlflow import models
from cifar_mlflow.errors import ModelError

MODEL_NAME_IN_RUN = "model"
# What a served model needs (no albumentations/grad-cam): pinned to the versions it was trained with.
SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "safetensors", "numpy")


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


def signature(num_classes: int) -> ModelSignature:
    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 32, 32))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )
    # Saved in MLmodel as `is_signature_from_type_hint: true`: MLflow then leaves input checking to the model
    # (_PyfuncClassifier.predict), as it does for models whose signature comes from their code's type hints.
    sig._is_signature_from_type_hint = True
    return sig


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
    if not (local / "MLmodel").is_file():
        raise ModelError(f"{model_uri}: not a cifar-mlflow model (it has no MLmodel file: not an MLflow model)")
    try:
        if (local / "MLmodel").stat().st_size > MAX_MLMODEL_BYTES:
            raise ModelError(f"{model_uri}: its MLmodel file is over {MAX_MLMODEL_BYTES:,} bytes; not parsed")
        flavors = Model.load(str(local)).flavors
    except (OSError, TypeError, ValueError, MlflowException) as exc:
        raise ModelError(f"{model_uri}: not a cifar-mlflow model (its MLmodel cannot be read: {exc})") from None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    data = pyfunc.get("data") if isinstance(pyfunc, dict) else None
    if not isinstance(data, str):
        found = ", ".join(sorted(map(str, flavors))) if isinstance(flavors, dict) and flavors else "none"
        raise ModelError(
            f"{model_uri}: not a cifar-mlflow model (its MLmodel names no python_function data folder, where this "
            f"project keeps model_config.json and weights.safetensors; its flavors: {found})"
        )
    files = (local / data).resolve()
    if files.is_relative_to(local) and not (files / models.CONFIG_FILE).is_file():
        loader = pyfunc.get("loader_module") if isinstance(pyfunc, dict) else None
        raise ModelError(
            f"{model_uri}: not a cifar-mlflow model (its data {str(data)[:80]!r} holds no {models.CONFIG_FILE}; "
            f"it is loaded by {str(loader)[:80]})"
        )
    if not files.is_relative_to(local):
        raise ModelError(f"{model_uri}: its MLmodel points the model's data outside the model's folder; refused")
    return files


def load_torch_model(model_uri: str, device: str = "cpu") -> tuple[Any, models.ModelSpec]:
    """A registered or logged model as a real torch.nn.Module (eval mode), rebuilt from its logged config with
    safetensors weights: hooks (GradCAM) work on it. Reads MLmodel, model_config.json and weights.safetensors;
    imports nothing from the model, whatever its MLmodel names, and unpickles nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        return models.load_model_files(_model_files_dir(model_uri, Path(tmp)), device=device)
