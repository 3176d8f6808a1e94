"""A restricted unpickler for CIFAR-10 batch files: plain containers, plain numpy arrays and scalars, nothing
else. Every global a pickle names resolves to a checking stand-in, so a planted payload (os.system, eval, ...) is
refused instead of executed, and numpy never restores a state the pickle crafted.

It reads what real producers write: the official files (Python 2's cPickle, protocol 2, every string a byte
string, numpy's reduction arguments included: typecode b'b', dtype name b'u1', byte order b'|'), and Python 3's
pickle.dump at protocols 2-5 (unicode strings, bytes as _codecs.encode(..., 'latin1') at protocol 2, numpy's
_frombuffer with an in-band buffer at protocol 5).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cifar_mlflow.errors import DataError


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something a CIFAR batch never holds."""


# Plain numeric dtypes, each with the byte orders its pickled state may name. A CIFAR-10 file holds uint8 pixels
# and a list of int labels; the other plain types are read so that read_batch can say what is wrong with them.
_PLAIN_DTYPES = {
    **{name: "|" for name in ("b1", "i1", "u1")},
    **{f"{kind}{size}": "<>=" for kind in "iuf" for size in (2, 4, 8)},
}


def _text(value: Any) -> Any:
    """A short name as numpy pickles it: str from Python 3, a byte string from Python 2 (read as bytes). Anything
    else is returned as it is, for the caller to refuse."""
    if isinstance(value, bytes) and len(value) <= 8:
        return value.decode("latin1")
    return value


class _PickledDtype:
    """Stands in for numpy.dtype(...) while unpickling. numpy restores a dtype from a state tuple without
    checking it (a crafted one crashes the interpreter), so the state is checked here and numpy only ever sees
    a plain type name and a byte order."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        name = _text(name)
        if not isinstance(name, str) or name not in _PLAIN_DTYPES or align not in (0, 1) or copy not in (0, 1):
            raise _Refused(f"refusing dtype {name!r:.40}: only plain numeric arrays are read")
        self.name = name
        self.dtype: np.dtype | None = None  # set by __setstate__ once the state is checked

    def __setstate__(self, state: Any) -> None:
        # numpy's state of a plain dtype: (3, byte order, None, None, None, -1, -1, 0), optionally + metadata None
        if isinstance(state, tuple) and len(state) > 1:
            state = (state[0], _text(state[1]), *state[2:])
        plain = (
            isinstance(state, tuple)
            and len(state) in (8, 9)
            and state[0] == 3
            and isinstance(state[1], str)
            and len(state[1]) == 1
            and state[1] in _PLAIN_DTYPES[self.name]
            and state[2:8] == (None, None, None, -1, -1, 0)
            and state[8:] in ((), (None,))
        )
        if not plain:
            raise _Refused(f"refusing a {self.name} dtype whose pickled state is not numpy's plain one")
        self.dtype = np.dtype(self.name).newbyteorder("=" if state[1] == "|" else state[1])


def _plain(dtype: Any) -> np.dtype:
    if not isinstance(dtype, _PickledDtype) or dtype.dtype is None:
        raise _Refused(f"refusing {type(dtype).__name__} where a plain dtype belongs")
    return dtype.dtype


class _PickledArray:
    """Stands in for numpy's `_reconstruct(ndarray, (0,), b'b')` and `ndarray.__setstate__`: the array is built
    with np.frombuffer from a checked (shape, plain dtype, bytes) state, never by numpy from the pickle's."""

    __slots__ = ("array",)

    def __init__(self, cls: Any, shape: Any, typecode: Any) -> None:
        if cls is not _NDARRAY or typecode not in (b"b", "b"):
            raise _Refused("refusing an array constructor that is not numpy's plain one")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self.array is not None or not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _Refused("refusing an array whose pickled state is not numpy's plain one")
        _, shape, dtype, fortran, raw = state
        self.array = _checked_array(shape, _plain(dtype), fortran, raw)


def _checked_array(shape: Any, dtype: np.dtype, fortran: Any, raw: Any) -> np.ndarray:
    """A native-order copy of `raw` as an array of `shape` and plain `dtype`, once all of them are checked."""
    if (
        not isinstance(shape, tuple)
        or len(shape) > 2
        or fortran not in (0, 1)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise _Refused(f"refusing an array of shape {shape!r:.80}")
    size = math.prod(shape) * dtype.itemsize
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != size:
        raise _Refused(
            f"an array of shape {shape} needs {size} bytes, the file holds "
            f"{len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__}"
        )
    native = dtype.newbyteorder("=")
    return np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").astype(native)


def _from_buffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _PickledArray:
    """Stands in for numpy's `_frombuffer(buffer, dtype, shape, order)`, its reduction at pickle protocol 5 (the
    buffer in-band, as BYTEARRAY8). The array is final: a BUILD aimed at it is refused."""
    order = _text(order)
    if order not in ("C", "F"):
        raise _Refused(f"refusing an array of order {order!r:.20}")
    held = _PickledArray(_NDARRAY, (0,), b"b")
    held.array = _checked_array(shape, _plain(dtype), order == "F", buf)
    return held


def _scalar(dtype: Any, raw: Any) -> Any:
    dtype = _plain(dtype)
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise _Refused("refusing a numpy scalar whose bytes do not match its dtype")
    return np.frombuffer(raw, dtype)[0].item()


def _latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); nothing else is needed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"refusing _codecs.encode(..., {encoding!r:.20})")
    return text.encode("latin1")


class _Global:
    """What a global named in the pickle resolves to: a call-only wrapper with no state to set, so that a
    BUILD aimed at it cannot rewire the stand-ins for the rest of the process."""

    __slots__ = ("_build",)
    _build: Callable[..., Any]  # the slot's type (set once, through object.__setattr__)

    def __init__(self, build: Callable[..., Any]) -> None:
        object.__setattr__(self, "_build", build)

    def __call__(self, *args: Any) -> Any:
        return self._build(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Refused("refusing to modify a constructor")

    def __setstate__(self, state: Any) -> None:
        raise _Refused("refusing to modify a constructor")


def _refuse_ndarray(*args: Any) -> None:
    raise _Refused("refusing to call numpy.ndarray directly")


_NDARRAY = _Global(_refuse_ndarray)
_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x and 2.x spellings
_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Global(_PickledDtype),
    ("_codecs", "encode"): _Global(_latin1),
    **{(m, "_reconstruct"): _Global(_PickledArray) for m in _MULTIARRAY},
    **{(m, "scalar"): _Global(_scalar) for m in _MULTIARRAY},
    **{(m, "_frombuffer"): _Global(_from_buffer) for m in _NUMERIC},
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, plain numpy arrays and scalars: a CIFAR batch needs nothing else. Every
    global the pickle names resolves to a checking stand-in above, so a planted payload (os.system, eval, ...)
    is refused instead of executed, and numpy never restores a state the pickle crafted."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _GLOBALS:
            raise _Refused(f"refusing to load {module}.{name}")
        return _GLOBALS[module, name]


def _materialised(value: Any) -> Any:
    """The arrays behind the stand-ins, where a CIFAR batch keeps them (a dict value, or the items of a list)."""
    if isinstance(value, _PickledArray):
        return value.array
    if isinstance(value, list):
        return [v.array if isinstance(v, _PickledArray) else v for v in value]
    return value


# Everything a mutated pickle can raise while being read: one line naming the file, never a traceback.
_UNREADABLE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    LookupError,
    MemoryError,
    RecursionError,
    OverflowError,
)


def load_pickle(path: Path) -> dict[str, Any]:
    """The dict a CIFAR-10 pickle holds (str keys, numpy arrays materialised), or one DataError line naming the
    file: missing, not a dict, or refused/unreadable by the restricted unpickler."""
    if not path.is_file():
        raise DataError(f"{path}: file is missing")
    try:
        with open(path, "rb") as fh:
            # encoding="bytes" reads the Python-2 pickles; keys may come back as bytes or str.
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
        # Python 2 wrote the keys as byte strings: b"data" and "data" are the same key here
        return {k.decode("latin1") if isinstance(k, bytes) else k: _materialised(v) for k, v in obj.items()}
    except _UNREADABLE as exc:
        reason = str(exc)[:200] or type(exc).__name__
        raise DataError(f"{path}: not a readable CIFAR-10 pickle ({reason})") from None
