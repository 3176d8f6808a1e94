"""How a config value is written as an MLflow param, whether a logged param string is the same value, and a training
run's params logged (again, on a resume)."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from cifar_mlflow import fields

if TYPE_CHECKING:
    from cifar_mlflow.tracking.logger import RunLogger


def as_param(value: Any) -> str:
    """How a value is logged: tuples (mean, std) as comma-separated numbers, booleans as the configs log them
    (fields.bool_as_word: "true"/"false", as MLproject passes them), everything else as str()."""
    value = fields.bool_as_word(value)
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def same(logged: str, value: Any) -> bool:
    """Is an already-logged string the same value? `mlflow run` logs -P values as typed ("1e-3"), we as parsed,
    and it logs a value that needs shell quoting quoted ("'/tmp/my data'"), as it puts it into the command."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(logged) == float(value)
        except ValueError:
            return False
    return as_param(value) in (logged, _unquoted(logged))


def _unquoted(logged: str) -> str:
    try:
        words = shlex.split(logged)
    except ValueError:  # unbalanced quotes: not something shlex.quote wrote
        return logged
    return words[0] if len(words) == 1 else logged


ENV_ON_RESUME = "resumed_env"  # tag prefix: what the environment was when a resume ran in another one


def log_run_params(log: RunLogger, params: dict[str, Any]) -> None:
    """The run's params; on a resumed run (an earlier process of ours logged its env/*) the recipe and the data
    must be the same (one line naming what differs), while the environment may have changed: another machine,
    device or library version after a crash is a resume, not another run. Its new values are tagged
    resumed_env/<key> (params cannot change) and printed."""
    logged = log.run().data.params
    env = {k: v for k, v in params.items() if k.startswith("env/")}
    if not any(k.startswith("env/") for k in logged):
        log.log_params(params)
        return
    log.log_params({k: v for k, v in params.items() if k not in env})
    changed = {k: v for k, v in env.items() if k not in logged or not same(logged[k], v)}
    if changed:
        log.set_tags({f"{ENV_ON_RESUME}/{k.removeprefix('env/')}": as_param(v) for k, v in changed.items()})
        was = ", ".join(f"{k} {logged.get(k, '-')} -> {as_param(v)}" for k, v in changed.items())
        print(f"note: resuming in another environment ({was}); tagged {ENV_ON_RESUME}/*")
