"""Write pickles encoded as Python 2's cPickle (protocol 2) with numpy wrote them: the encoding of the official
CIFAR-10 files. Python 3's pickle cannot: it writes every str as unicode (BINUNICODE) and every bytes object as
`_codecs.encode(..., 'latin1')`, where Python 2 wrote byte strings (SHORT_BINSTRING / BINSTRING), also inside
numpy's own reduction of an array (typecode 'b', dtype name 'u1', byte order '|', the raw pixel bytes).

What is emitted follows cPickle exactly where a reader could tell: memo ids count from 1, containers, globals,
reduced objects and strings held in containers are memoized, temporaries (tuples, reduce arguments) are not,
and containers are written in batches of 1,000 (MARK ... APPENDS/SETITEMS, one item: APPEND/SETITEM).
tests/test_cifar_files.py checks a numpy array against a pickle that Python 2 + numpy really wrote, byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np

_BATCH = 1000  # cPickle's BATCHSIZE for APPENDS / SETITEMS
# numpy 1.x's module path, the one Python 2's numpy wrote (numpy 2 still reads it)
_RECONSTRUCT = b"cnumpy.core.multiarray\n_reconstruct\n"


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memoized = 0  # cPickle's memo ids start at 1
        self.globals: dict[bytes, int] = {}  # a global written once is fetched again by its memo id

    def memo(self, n: int, short: bytes, long: bytes) -> None:
        """A memo opcode with its id: one byte up to 255, else four (BINPUT/LONG_BINPUT, BINGET/LONG_BINGET)."""
        self.out += short + bytes([n]) if n < 256 else long + struct.pack("<I", n)

    def put(self) -> int:
        """Memoize what was just written (BINPUT / LONG_BINPUT), as cPickle does for long-lived objects."""
        self.memoized += 1
        self.memo(self.memoized, b"q", b"r")
        return self.memoized

    def global_(self, spelled: bytes) -> None:
        if spelled in self.globals:  # BINGET
            self.memo(self.globals[spelled], b"h", b"j")
            return
        self.out += spelled
        self.globals[spelled] = self.put()

    def string(self, value: str | bytes, memoize: bool) -> None:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        self.out += b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw))
        self.out += raw
        if memoize:
            self.put()

    def int_(self, value: int) -> None:
        if 0 <= value <= 0xFF:
            self.out += b"K" + bytes([value])
        elif 0 <= value <= 0xFFFF:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:  # cPickle's fallback for a 64-bit int: the text INT opcode
            self.out += b"I" + str(value).encode() + b"\n"

    def value(self, obj: Any, memoize: bool = True) -> None:
        """`memoize`: whether a string here outlives the pickling (held by a container) as cPickle would see it."""
        if obj is None:
            self.out += b"N"
        elif isinstance(obj, bool):
            self.out += b"\x88" if obj else b"\x89"  # NEWTRUE / NEWFALSE
        elif isinstance(obj, (int, np.integer)):
            self.int_(int(obj))
        elif isinstance(obj, (str, bytes)):
            self.string(obj, memoize)
        elif isinstance(obj, tuple):
            self.tuple_(obj)
        elif isinstance(obj, list):
            self.out += b"]"
            self.put()
            self.batched(obj, b"a", b"e", self.value)
        elif isinstance(obj, dict):
            self.out += b"}"
            self.put()
            self.batched(list(obj.items()), b"s", b"u", self.item)
        elif isinstance(obj, np.ndarray):
            self.array(obj)
        elif isinstance(obj, np.dtype):
            self.dtype(obj)
        else:
            raise TypeError(f"py2_pickle cannot write a {type(obj).__name__}")

    def item(self, key_value: tuple[Any, Any]) -> None:
        self.value(key_value[0])
        self.value(key_value[1])

    def tuple_(self, items: tuple[Any, ...]) -> None:
        if not items:
            self.out += b")"
            return
        if len(items) > 3:
            self.out += b"("
        for item in items:
            self.value(item, memoize=False)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t")

    def batched(self, items: list[Any], one: bytes, many: bytes, save: Callable[[Any], None]) -> None:
        for start in range(0, len(items), _BATCH):
            chunk = items[start : start + _BATCH]
            if len(chunk) > 1:
                self.out += b"("
            for item in chunk:
                save(item)
            self.out += many if len(chunk) > 1 else one

    def dtype(self, dtype: np.dtype) -> None:
        """numpy's `dtype.__reduce__` as Python 2 wrote it: dtype('u1', 0, 1) then BUILD((3, '|', ...))."""
        if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
            raise TypeError(f"py2_pickle writes plain numeric dtypes only, not {dtype}")
        self.global_(b"cnumpy\ndtype\n")
        self.tuple_((dtype.str[1:], 0, 1))
        self.out += b"R"
        self.put()
        order = "|" if dtype.itemsize == 1 else dtype.byteorder.replace("=", "<" if np.little_endian else ">")
        self.tuple_((3, order, None, None, None, -1, -1, 0))
        self.out += b"b"

    def array(self, array: np.ndarray) -> None:
        """numpy's `ndarray.__reduce__`: _reconstruct(ndarray, (0,), 'b') then BUILD((1, shape, dtype, fortran,
        raw bytes))."""
        self.global_(_RECONSTRUCT)
        self.global_(b"cnumpy\nndarray\n")
        self.tuple_((0,))
        self.string(b"b", memoize=False)
        self.out += b"\x87R"  # TUPLE3, REDUCE
        self.put()
        fortran = bool(array.flags.f_contiguous and not array.flags.c_contiguous)
        self.out += b"("
        self.int_(1)
        self.tuple_(tuple(int(n) for n in array.shape))
        self.dtype(array.dtype)
        self.value(fortran)
        self.string(array.tobytes(order="F" if fortran else "C"), memoize=False)
        self.out += b"tb"  # TUPLE, BUILD


def dumps(obj: Any) -> bytes:
    """`obj` (dicts, lists, tuples, str/bytes as byte strings, ints, bools, None, plain numeric numpy arrays)
    pickled as Python 2's cPickle.dump(obj, f, 2) with numpy would have written it."""
    writer = _Writer()
    writer.value(obj)
    writer.out += b"."
    return bytes(writer.out)
