"""Config fields that carry their help text and allowed values, the check of a value against them, and the
composition of a config from other configs' fields by name."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, dataclass_transform

from cifar_mlflow.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Config = TypeVar("_Config", bound="DataclassInstance")


def param(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    pattern: tuple[str, str] | None = None,
    also: tuple[str, ...] = (),
) -> Any:
    """A dataclass field that also carries the help text and the allowed values (used by validation and click).
    pattern: (regular expression the whole string must match, how to describe it to a user).
    also: words accepted besides the typed values (e.g. "auto" for the learning rate)."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "low": low,
            "high": high,
            "low_open": low_open,
            "high_open": high_open,
            "pattern": pattern,
            "also": also,
        },
    )


def allowed(f: dataclasses.Field) -> str:
    """Human description of what a field accepts, e.g. "one of sgd, adam" or "an integer >= 1"."""
    m = f.metadata
    if m["choices"]:
        return "one of " + ", ".join(m["choices"])
    if m["pattern"]:
        return m["pattern"][1]
    kind = {int: "an integer", float: "a number", str: "a non-empty string", bool: "true or false"}[field_type(f)]
    bounds = []
    if m["low"] is not None:
        bounds.append(f"{'>' if m['low_open'] else '>='} {m['low']:g}")
    if m["high"] is not None:
        bounds.append(f"{'<' if m['high_open'] else '<='} {m['high']:g}")
    also = "".join(f", or {word}" for word in m["also"])
    return kind + (" " + " and ".join(bounds) if bounds else "") + also


def field_type(f: dataclasses.Field) -> type:
    """The field's value type (int, float, str or bool); `float | str` fields take a number or one of their words."""
    name = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "str": str, "bool": bool, "float | str": float}[name]


def bool_as_word(value: Any) -> Any:
    """Booleans as the words the MLproject, `-P` and MLflow's params spell them (true/false); any other value as
    it is."""
    return str(value).lower() if isinstance(value, bool) else value


SHOWN_CHARS = 120  # what a one-line error quotes of a bad value: enough to recognise it, never a flood


def shown(value: Any) -> str:
    """repr() for an error line, capped at SHOWN_CHARS (a 60 KB string or a huge list is cut, marked '...')."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[: SHOWN_CHARS - 3]}..."


def check(f: dataclasses.Field, value: Any) -> Any:
    """Return the value coerced to the field's type, or raise ConfigError naming the field and what is allowed."""
    kind, m = field_type(f), f.metadata
    bad = ConfigError(f"{f.name}={shown(value)} is not allowed: expected {allowed(f)}")
    if isinstance(value, str) and value in m["also"]:
        return value
    if isinstance(value, bool) != (kind is bool):
        raise bad
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise bad
    # value is an instance of kind now (bool settled above), so isinstance(value, float) means `kind is float`
    # and isinstance(value, str) `kind is str`: the checks below narrow the value's type for type checkers
    if isinstance(value, float) and not math.isfinite(value):
        raise bad
    if isinstance(value, str) and (
        not value.strip()
        or (m["choices"] and value not in m["choices"])
        or (m["pattern"] and not re.fullmatch(m["pattern"][0], value))
    ):
        raise bad
    if m["low"] is not None and (value < m["low"] or (m["low_open"] and value == m["low"])):
        raise bad
    if m["high"] is not None and (value > m["high"] or (m["high_open"] and value == m["high"])):
        raise bad
    return value


class Validated:
    """Validates and type-coerces every field of a frozen dataclass on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, check(f, getattr(self, f.name)))

    def to_params(self) -> dict[str, Any]:
        """Every field as a flat dict: what gets logged as MLflow params (no hand-kept list), booleans as the
        strings `mlflow run` logs for them (true/false)."""
        return {k: bool_as_word(v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]


def replace(cfg: _Config, **changes: Any) -> _Config:
    """dataclasses.replace for any config. Type checkers do not see the fields a Composed config takes by name
    (config()), so they would refuse those names here; the dataclass itself still refuses a name it lacks
    (TypeError) and validates the new values (Validated)."""
    return dataclasses.replace(cfg, **changes)


class Composed(Validated):
    """Base of configs that take fields from others by name (config()): type checkers do not see those."""

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field, param))
def config(*taken: tuple[Any, Iterable[str]], own_first: bool = False) -> Callable[[type], Any]:
    """Class decorator: a frozen, validated dataclass of the named fields of other configs (the same default,
    help and allowed values: each is defined once) followed by the class's own fields (own_first: preceded).
    The class records where each taken field comes from in `__taken__` (name -> config)."""

    def make(cls: type) -> Any:
        own = dict(cls.__dict__.get("__annotations__", {}))
        fields: dict[str, Any] = {}
        cls.__taken__ = {}  # type: ignore[attr-defined]
        for source, names in taken:
            for name in names:
                if name in own or name in fields:
                    raise TypeError(f"{cls.__name__}.{name} is defined twice")
                f = source.__dataclass_fields__[name]
                fields[name] = f.type
                setattr(cls, name, field(default=f.default, metadata=f.metadata))
                cls.__taken__[name] = source  # type: ignore[attr-defined]
        cls.__annotations__ = {**own, **fields} if own_first else {**fields, **own}
        return dataclass(frozen=True)(cls)

    return make
