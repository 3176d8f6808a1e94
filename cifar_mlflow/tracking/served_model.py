"""The code that serves a cifar-mlflow model, logged with every model as MLflow's "model from code": MLmodel's
python_function flavor names this file (copied into the model), and `mlflow.pyfunc.load_model` or
`mlflow models serve` executes it. It imports numpy, torch and mlflow only, never cifar_mlflow, so a registered
model serves wherever its logged requirements are installed.

The network itself is the model's `pytorch` flavor: a torch.export program (`model.pt2`), loaded here with
MLflow's pickle-free check of the archive forced on (load_network). This file wraps it: checks each request
(`as_images`) and answers class probabilities.

predict takes a list of images, each nested lists as JSON parsed them or a numpy array (3, 32, 32). Its type hint
is MLflow's documented way to receive a request's values as parsed, not cast to a signature's type first (which
would turn true into 1.0, "0.5" into 0.5 and null into NaN): a union is "inferred as AnyType", so MLflow checks
only that the input is a list and leaves the values to the model.
"""

import logging
import os
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

PYTORCH_ARTIFACT = "pytorch"  # the artifact (a folder) holding the pytorch-flavor model: MLmodel + data/model.pt2
# A served request of more images is refused before any of it is converted or computed: 1024 images are ~60 MB of
# JSON and ~10 s of CPU; larger batches belong in-process (mlflow.pytorch.load_model has no such limit).
MAX_REQUEST_IMAGES = 1024
IMAGE_SHAPE = (3, 32, 32)
INPUT = "float32 images (N, 3, 32, 32) with values in [0, 1] (pixel / 255)"
BATCH = 512  # images per forward pass


class InvalidImages(ValueError):
    """A request that is not a batch of images (one line naming what is wrong)."""


def as_images(value: object, max_images: int | None = None) -> np.ndarray:
    """Model input checked and converted: float32 (N, 3, 32, 32), finite, in [0, 1]. `value` is an array, a
    list of arrays, or nested lists as JSON parsed them (`max_images` caps a list); anything else is an
    InvalidImages naming what is wrong."""
    if isinstance(value, list) and max_images is not None and len(value) > max_images:
        raise InvalidImages(
            f"a request of {len(value)} images is too large: at most {max_images} per request "
            "(send several, or predict in-process with mlflow.pytorch.load_model)"
        )
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        value = np.stack(value) if len({v.shape for v in value}) == 1 else np.array(value, dtype=object)
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise InvalidImages(f"input of dtype {value.dtype} is not allowed: expected {INPUT}")
        x = value
    elif isinstance(value, list):
        x = _json_numbers(value)
    else:
        raise InvalidImages(f"input of type {type(value).__name__} is not allowed: expected {INPUT}")
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise InvalidImages(f"input of shape {x.shape} is not allowed: expected {INPUT}")
    bad = ~np.isfinite(x)
    if bad.any():
        raise InvalidImages(f"input holds {int(bad.sum())} NaN or infinite values: expected {INPUT}")
    outside = (x < 0) | (x > 1)
    if outside.any():
        raise InvalidImages(
            f"input holds {int(outside.sum())} values outside [0, 1], e.g. {x[outside][0]:g}: expected {INPUT}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _json_numbers(value: list) -> np.ndarray:
    """Nested lists -> float64 array, refusing what JSON would carry but is not a pixel value: booleans, strings,
    null, objects. Integers pass (JSON has one number type: a JavaScript client sends 0.0 as 0); the range check
    refuses 0-255 pixel values."""
    try:
        cells = np.array(value, dtype=object)
    except ValueError as exc:  # ragged beyond what an object array can hold
        raise InvalidImages(f"input is not a regular nested list ({exc}): expected {INPUT}") from None
    if cells.ndim != 4 or cells.shape[1:] != IMAGE_SHAPE:
        raise InvalidImages(f"input of shape {cells.shape} is not allowed: expected {INPUT}")
    kinds = set(map(type, cells.flat))
    if not kinds <= {float, int}:
        names = {bool: "booleans", str: "strings", type(None): "nulls", list: "ragged lists", dict: "objects"}
        found = ", ".join(sorted(names.get(k, k.__name__) for k in kinds - {float, int}))
        raise InvalidImages(f"input holds {found}, which are not pixel values: expected {INPUT}")
    return cells.astype(np.float64)


def probabilities(module: torch.nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Class probabilities (N, C), float32, of images checked by as_images: softmax of the module's logits, fp32,
    in batches of BATCH."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            x = torch.from_numpy(images[start : start + BATCH]).to(device)
            out.append(torch.softmax(module(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out)


PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def load_network(model_uri: str) -> torch.nn.Module:
    """mlflow.pytorch.load_model with MLflow's check of the archive forced on: every record must be JSON, text,
    raw tensor bytes, or a pickle that torch's weights_only unpickler accepts (tensors and containers), else it is
    refused before torch.export.load reads it. MLflow 3.17 runs that check only where
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (its default is true), and torch.export.load falls back to a full
    unpickling of a record its restricted unpickler refuses: unchecked, a tampered archive runs code."""
    before = os.environ.get(PICKLE_SWITCH)
    os.environ[PICKLE_SWITCH] = "false"
    try:
        return mlflow.pytorch.load_model(model_uri)
    finally:
        if before is None:
            os.environ.pop(PICKLE_SWITCH, None)
        else:
            os.environ[PICKLE_SWITCH] = before


def prediction_device() -> torch.device:
    """MLflow's rule for pytorch models: MLFLOW_DEFAULT_PREDICTION_DEVICE if set, else CUDA when available."""
    chosen = os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE")
    return torch.device(chosen or ("cuda" if torch.cuda.is_available() else "cpu"))


# MLflow reads predict's type hint as the class is made, and logs that the union "is inferred as AnyType, and MLflow
# doesn't validate the data": intended (as_images does), and not worth a warning on every load.
_type_hints_log = logging.getLogger("mlflow.types.type_hints")
_level = _type_hints_log.level
_type_hints_log.setLevel(logging.ERROR)
try:

    class CifarClassifier(PythonModel):
        """float32 images in [0, 1], (N, 3, 32, 32), in; class probabilities (N, C) out. Class names are in the
        model's metadata (`metadata["class_names"]`)."""

        def load_context(self, context: Any) -> None:
            self.device = prediction_device()
            # The program is exported on the CPU and uses no device-bound constants: its weights move to any device.
            module = load_network(context.artifacts[PYTORCH_ARTIFACT])
            self.module = module.to(self.device)

        def predict(  # type: ignore[override]  # MLflow also takes predict without its context argument
            self, model_input: list[list[Any] | np.ndarray], params: dict[str, Any] | None = None
        ) -> list[list[float]]:
            try:
                x = as_images(model_input, max_images=MAX_REQUEST_IMAGES)
            except InvalidImages as exc:
                # The scoring server quotes the request in its error message: the refused images are emptied first,
                # so that the 400 answers at once with the reason instead of megabytes of numbers.
                for image in model_input:
                    if isinstance(image, list):
                        image.clear()
                raise MlflowException.invalid_parameter_value(str(exc)) from None
            return probabilities(self.module, x, self.device).tolist()

finally:
    _type_hints_log.setLevel(_level)


if __name__ != "cifar_mlflow.tracking.served_model":  # executed by MLflow as the model's code, not imported
    mlflow.models.set_model(CifarClassifier())
