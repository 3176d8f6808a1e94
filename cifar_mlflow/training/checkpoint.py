"""Training checkpoints: everything needed to continue a run exactly where it stopped (model, optimiser,
scheduler, gradient scaler, RNG states, epoch, metric history), saved with torch.save and read back with
`torch.load(weights_only=True)`, which refuses to run code hidden in a pickle. Knows nothing of MLflow."""

from __future__ import annotations

import copy
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_mlflow.errors import ModelError, first_line

FORMAT = 1


def capture(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    history: list[dict[str, float]],
    lr_steps: list[float],
) -> dict[str, Any]:
    """The complete training state after `epoch` (1-based), as tensors and plain Python values only."""
    np_state = np.random.get_state(legacy=False)
    return {
        "format": FORMAT,
        "epoch": epoch,
        "history": [dict(h) for h in history],
        "lr_steps": list(lr_steps),
        # copies, not references: the state may be written out in the background while training goes on
        "model": _cpu_copy(model.state_dict()),
        "optimizer": _cpu_copy(optimizer.state_dict()),
        "scheduler": _cpu_copy(scheduler.state_dict()),
        "scaler": _cpu_copy(scaler.state_dict()) if scaler is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                "pos": int(np_state["state"]["pos"]),
                "has_gauss": int(np_state["has_gauss"]),
                "gauss": float(np_state["gauss"]),
            },
            "python": _to_lists(random.getstate()),
        },
    }


def restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Put a captured state back into freshly built objects (the same architecture and optimiser). A state that
    does not fit them is a one-line ModelError."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise ModelError(
            f"the checkpoint of epoch {state.get('epoch')} does not fit this run's model and optimiser "
            f"({first_line(exc)})"
        ) from None
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    random.setstate(_to_tuples(rng["python"]))


def save(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint file. Crash safety comes from where it goes (tracking.checkpoint_store.log_checkpoint: two
    alternating slots and a manifest written last), so this staging copy is not fsynced: forcing 90 MB to disk every
    epoch only to upload and delete the file would cost seconds on a slow volume."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load(path: Path, name: str | None = None) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True: tensors and plain containers only, nothing executed. name: what
    to call the file in errors (where it came from, rather than a temporary download)."""
    name = name or str(path)
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{name}: not a loadable checkpoint ({first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelError(f"{name}: not a cifar-mlflow checkpoint (format {FORMAT})")
    problem = _problem(state)
    if problem:
        raise ModelError(f"{name}: not a complete cifar-mlflow checkpoint ({problem})")
    return state


# What capture() writes, as (key, type): a checkpoint lacking one of them cannot be resumed from.
_FIELDS = (
    ("epoch", int),
    ("history", list),
    ("lr_steps", list),
    ("model", dict),
    ("optimizer", dict),
    ("scheduler", dict),
    ("rng", dict),
)
_RNG_FIELDS = (("torch", torch.Tensor), ("cuda", list), ("numpy", dict), ("python", list))


def _problem(state: dict[str, Any]) -> str | None:
    """What is missing or malformed in a loaded checkpoint, or None."""
    for fields, where in ((_FIELDS, state), (_RNG_FIELDS, state.get("rng"))):
        for key, kind in fields:
            if not isinstance(where, dict) or key not in where:
                return f"it lacks {key!r}" if where is state else f"its rng lacks {key!r}"
            if not isinstance(where[key], kind) or (kind is int and isinstance(where[key], bool)):
                return f"{key!r} is a {type(where[key]).__name__}, not a {kind.__name__}"
    epoch, history = state["epoch"], state["history"]
    if epoch < 1 or len(history) != epoch or not all(isinstance(h, dict) for h in history):
        return f"epoch {epoch} with {len(history)} epochs of history"
    return None


def _cpu_copy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _cpu_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu_copy(v) for v in x)
    return copy.deepcopy(x)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
