"""A sweep's search space: which `main` parameters a trial draws, and from what. The default space, a YAML file's
space, and the checks that refuse a bad one with one line before any trial runs. Knows nothing of Optuna or MLflow:
sweeps/studies.py turns a Dim into an Optuna suggestion.

A space file is a YAML list, one entry per searched parameter:

    - {name: lr, type: float, low: 0.01, high: 0.4, log: true}
    - {name: batch_size, type: int, low: 64, high: 512, log: true}
    - {name: augment, type: categorical, choices: [standard, flip-cutout, none]}

`type` is float (number parameters), int (integer parameters) or categorical (any searchable parameter);
float and int take `low` < `high` and an optional `log: true` (low > 0), categorical takes `choices`. Every value
must be one the parameter allows in `main`."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_mlflow.config import TrainConfig, scaled_lr
from cifar_mlflow.errors import ConfigError
from cifar_mlflow.fields import check, field_type, shown
from cifar_mlflow.values import check_loader

# `main` parameters a sweep may search: the recipe, not where the data lives, how long a trial runs or how the
# machine computes it (those are the sweep's fixed base).
SEARCHABLE = (
    "batch_size lr optimizer momentum weight_decay l1 label_smoothing scheduler augment arch norm seed"
).split()
TYPES = ("float", "int", "categorical")
SPACE_KEYS = {"float": {"low", "high", "log"}, "int": {"low", "high", "log"}, "categorical": {"choices"}}
MAX_SPACE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Dim:
    """One searched parameter: a float or int range (log-uniform if log), or a list of choices."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"name": self.name, "type": self.type, "choices": list(self.choices)}
        return {"name": self.name, "type": self.type, "low": self.low, "high": self.high, "log": self.log}


def default_space(base: TrainConfig) -> list[Dim]:
    """Small and sensible around the base recipe: peak LR log-uniform from a quarter to four times the base's
    (lr=scaled: its value at the base's batch size; not searched when lr=auto: the range test picks it), weight decay log-uniform over two decades around 5e-4,
    label smoothing 0-0.2, and the augmentation presets the device loader also has."""
    dims = []
    if base.lr != "auto":  # centred on the LR the base trains with: lr=scaled's value at the base's batch size
        centre = scaled_lr(base.batch_size) if base.lr == "scaled" else float(base.lr)
        dims.append(Dim("lr", "float", centre / 4, min(centre * 4, 10.0), log=True))
    dims += [
        Dim("weight_decay", "float", 5e-5, 5e-3, log=True),
        Dim("label_smoothing", "float", 0.0, 0.2),
        Dim("augment", "categorical", choices=("standard", "flip-cutout", "none")),
    ]
    return checked(dims, base, "the default space")


def load_space(path: str, base: TrainConfig) -> list[Dim]:
    """The space a YAML file describes (module docstring), checked against the base recipe."""
    import yaml

    where = f"space={shown(path)}"
    try:
        text = _read_capped(Path(path), where)
        _plain_yaml(text, where)
        raw = yaml.load(text, Loader=_loader())
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read ({exc.strerror or exc}): expected a YAML space file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where} is not valid YAML ({first})") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: expected a non-empty YAML list of {{name, type, ...}} entries")
    return checked([_dim(entry, i, where) for i, entry in enumerate(raw, start=1)], base, where)


def _read_capped(file: Path, where: str) -> str:
    """The text of a regular file of at most MAX_SPACE_BYTES, reading no more than that + 1 bytes: a device
    (/dev/zero), a FIFO or a file growing while it is read never makes it read on (the size a stat gives is 0
    for a device or a FIFO). Opened without blocking, so that a FIFO with no writer does not hang the open."""
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{where} is not a regular file: expected a YAML space file")
        raw = fh.read(MAX_SPACE_BYTES + 1)
    if len(raw) > MAX_SPACE_BYTES:
        raise ConfigError(f"{where}: the file is over {MAX_SPACE_BYTES // 1024} KB; a space is a short list")
    return raw.decode("utf-8")


MAX_SPACE_DEPTH = 3  # the list of entries, an entry's mapping, a choices list


def _plain_yaml(text: str, where: str) -> None:
    """Refuse anchors and aliases (a 300-byte 'billion laughs' expands to gigabytes) and nesting past a space's
    three levels, from PyYAML's event stream: before anything is expanded, built (the composer recurses: 20,000
    levels are a RecursionError) or printed."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ConfigError(f"{where}: uses YAML anchors or aliases (&name, *name); write each value out")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_SPACE_DEPTH:
                raise ConfigError(
                    f"{where}: nested deeper than {MAX_SPACE_DEPTH} levels; a space is a list of flat entries"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _loader() -> Any:
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and every other YAML tool) does: PyYAML follows YAML 1.1,
    where `1e-3` (no dot) is the string '1e-3', so `low: 1e-3` would be refused as not a number."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"),
    )
    return Loader


def _dim(entry: Any, i: int, where: str) -> Dim:
    at = f"{where}, entry {i}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{at}: expected a mapping like {{name: lr, type: float, low: 0.01, high: 0.4}}")
    name, kind = entry.get("name"), entry.get("type")
    if name not in SEARCHABLE:
        raise ConfigError(f"{at}: name={shown(name)} is not allowed: expected one of {', '.join(SEARCHABLE)}")
    if kind not in TYPES:
        raise ConfigError(f"{at} ({name}): type={shown(kind)} is not allowed: expected one of {', '.join(TYPES)}")
    unknown = sorted(set(entry) - {"name", "type"} - SPACE_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"{at} ({name}): key {shown(unknown[0])} is not allowed for type {kind}: expected "
            f"{', '.join(sorted(SPACE_KEYS[kind]))}"
        )
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{at} ({name}): choices={shown(choices)} is not allowed: expected a non-empty list")
        return Dim(name, kind, choices=tuple(choices))
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{at} ({name}): log={shown(log)} is not allowed: expected true or false")
    for key in ("low", "high"):
        if key not in entry:
            raise ConfigError(f"{at} ({name}): {key} is missing: a {kind} range needs low and high")
    return Dim(name, kind, entry["low"], entry["high"], log)


def checked(dims: list[Dim], base: TrainConfig, where: str) -> list[Dim]:
    """Each dim's bounds or choices are values its parameter allows (as in `main`), low < high, log only over
    positive bounds, each parameter once, and every choice works with the base recipe."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    seen: set[str] = set()
    for dim in dims:
        at = f"{where} ({dim.name})"
        if dim.name in seen:
            raise ConfigError(f"{at}: {dim.name} is searched twice; each parameter may appear once")
        seen.add(dim.name)
        f = fields[dim.name]
        if dim.type == "categorical":
            if len(set(map(repr, dim.choices))) != len(dim.choices):
                raise ConfigError(f"{at}: choices {shown(list(dim.choices))} repeat a value")
            for choice in dim.choices:
                _allowed(f, choice, at, "choice")
                _with_base(base, dim.name, check(f, choice), at)
            continue
        kind = field_type(f)
        if dim.type == "float" and kind is not float or dim.type == "int" and kind is not int:
            raise ConfigError(
                f"{at}: type={dim.type} is not allowed for {dim.name}, which takes {kind.__name__} values "
                f"(type: {'float' if kind is float else 'int' if kind is int else 'categorical'})"
            )
        for key, value in (("low", dim.low), ("high", dim.high)):
            if dim.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{at}: {key}={shown(value)} is not allowed: expected an integer")
            _allowed(f, value, at, key)
        assert dim.low is not None and dim.high is not None
        if not dim.low < dim.high:
            raise ConfigError(f"{at}: low={shown(dim.low)} is not allowed: expected a number < high={shown(dim.high)}")
        if dim.log and dim.low <= 0:
            raise ConfigError(f"{at}: low={shown(dim.low)} is not allowed with log: true: expected a number > 0")
    return dims


def _allowed(f: dataclasses.Field, value: Any, at: str, key: str) -> None:
    try:
        check(f, value)
    except ConfigError as exc:
        raise ConfigError(f"{at}: {key} {exc}") from None


def _with_base(base: TrainConfig, name: str, value: Any, at: str) -> None:
    """A choice that the base recipe rules out (loader=device with augment=heavy) is refused now, not mid-sweep."""
    try:
        check_loader(dataclasses.replace(base, **{name: value}))
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None
