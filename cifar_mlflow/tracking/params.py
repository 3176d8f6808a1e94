"""How a config value is written as an MLflow param, and whether a logged param string is the same value."""

from __future__ import annotations

import shlex
from typing import Any

from cifar_mlflow import fields


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
