"""Data: read the CIFAR-10 python layout safely, download + MD5-check + extract the archive, build the real
offline `digits` set in the same layout, generate the synthetic stand-in, compute normalisation statistics and
build the data loaders.

Images stay uint8 HWC numpy arrays end to end (airbench-style: one array per split); the conversion to float,
CHW/channels_last and normalisation happen on the device, inside the engine and the model.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar_mlflow.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# A mirror serving the same archive can be named here; the MD5 is checked all the same.
URL_ENV = "CIFAR_MLFLOW_CIFAR10_URL"
LAYOUT = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
NUM_CLASSES = 10
IMAGE_BYTES = 3 * 32 * 32

SYNTHETIC_CLASSES = (
    "red-disc",
    "green-square",
    "blue-triangle",
    "yellow-cross",
    "magenta-ring",
    "cyan-hbar",
    "orange-vbar",
    "purple-diamond",
    "white-x",
    "lime-frame",
)
# Same sizes as CIFAR-10 so that synthetic is a drop-in stand-in; only the first N requested are rendered.
SYNTHETIC_SIZES = {"train": 50_000, "test": 10_000}

# The real offline set: scikit-learn's bundled handwritten digits (1,797 8x8 images of 0-16 ink counts, the UCI
# "optdigits" test set), written once into this folder of data_dir in the CIFAR-10 layout and then read by the
# same reader as CIFAR-10.
DIGITS_LAYOUT = "digits-batches-py"
DIGITS_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Test split: 30 images of each class drawn with a fixed seed (300 in all, the rest train), so the split is the
# same everywhere and both splits mix all 13 writers. (Scikit-learn's order groups writers: its last 300 images
# are mostly hands the first 1,497 lack, a test of those few writers on which even an RBF SVM reaches only 0.95,
# against 0.99 on a stratified split; benchmarks/RESULTS.md.)
DIGITS_TEST_PER_CLASS = 30
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    """One split: images (N, 32, 32, 3) uint8 and labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> Split:
        """The first n samples (n = 0 means all)."""
        return self if n <= 0 or n >= len(self) else Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    """A named dataset with both splits, its class names and where it came from."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    source: str


# ---------------------------------------------------------------------------------------------------------------
# Reading the CIFAR-10 python layout


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something a CIFAR batch never holds."""


# Plain numeric dtypes, each with the byte orders its pickled state may name. A CIFAR-10 file holds uint8 pixels
# and a list of int labels; the other plain types are read so that read_batch can say what is wrong with them.
_PLAIN_DTYPES = {
    **{name: "|" for name in ("b1", "i1", "u1")},
    **{f"{kind}{size}": "<>=" for kind in "iuf" for size in (2, 4, 8)},
}


class _PickledDtype:
    """Stands in for numpy.dtype(...) while unpickling. numpy restores a dtype from a state tuple without
    checking it (a crafted one crashes the interpreter), so the state is checked here and numpy only ever sees
    a plain type name and a byte order."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(name, str) or name not in _PLAIN_DTYPES or align not in (0, 1) or copy not in (0, 1):
            raise _Refused(f"refusing dtype {name!r:.40}: only plain numeric arrays are read")
        self.name, self.dtype = name, None

    def __setstate__(self, state: Any) -> None:
        # numpy's state of a plain dtype: (3, byte order, None, None, None, -1, -1, 0), optionally + metadata None
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
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _Refused("refusing an array whose pickled state is not numpy's plain one")
        _, shape, dtype, fortran, raw = state
        dtype = _plain(dtype)
        if (
            not isinstance(shape, tuple)
            or len(shape) > 2
            or fortran not in (0, 1)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise _Refused(f"refusing an array of shape {shape!r:.80}")
        size = math.prod(shape) * dtype.itemsize
        if not isinstance(raw, bytes) or len(raw) != size:
            raise _Refused(
                f"an array of shape {shape} needs {size} bytes, the file holds "
                f"{len(raw) if isinstance(raw, bytes) else type(raw).__name__}"
            )
        native = dtype.newbyteorder("=")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").astype(native)


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
_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Global(_PickledDtype),
    ("_codecs", "encode"): _Global(_latin1),
    **{(m, "_reconstruct"): _Global(_PickledArray) for m in _MULTIARRAY},
    **{(m, "scalar"): _Global(_scalar) for m in _MULTIARRAY},
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


def _load_pickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: file is missing")
    try:
        with open(path, "rb") as fh:
            # encoding="bytes" reads the Python-2 pickles; keys may come back as bytes or str.
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
        return {k.decode("latin1") if isinstance(k, bytes) else k: _materialised(v) for k, v in obj.items()}
    except _UNREADABLE as exc:
        reason = str(exc)[:200] or type(exc).__name__
        raise DataError(f"{path}: not a readable CIFAR-10 pickle ({reason})") from None


def read_batch(path: Path) -> Split:
    """Read and validate one batch file: 'data' (N, 3072) uint8, 'labels' N ints in 0-9."""
    d = _load_pickle(path)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != IMAGE_BYTES or data.dtype != np.uint8:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a (N, {IMAGE_BYTES}) uint8 array, got shape {shape} dtype {dtype}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise DataError(f"{path}: 'labels' must be a list of integers 0-9") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but 'labels' has shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)][0]
        raise DataError(f"{path}: label {bad} is outside 0-{NUM_CLASSES - 1}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Split(images, labels)


def read_class_names(path: Path) -> tuple[str, ...]:
    names = _load_pickle(path).get("label_names")
    ok = isinstance(names, list) and len(names) == NUM_CLASSES and all(isinstance(n, (bytes, str)) for n in names)
    if not ok:  # described by type and length: repr() of a crafted, deeply nested value would itself fail
        got = f"{type(names).__name__} of length {len(names)}" if isinstance(names, list) else type(names).__name__
        raise DataError(f"{path}: 'label_names' must list {NUM_CLASSES} class names (strings), got a {got}")
    try:
        return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)
    except UnicodeDecodeError:
        raise DataError(f"{path}: 'label_names' holds a name that is not UTF-8 text") from None


def _concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


def _empty_split() -> Split:
    return Split(np.empty((0, 32, 32, 3), np.uint8), np.empty(0, np.int64))


def read_cifar10(root: Path, max_train: int = 0, max_test: int = 0, test_only: bool = False) -> Dataset:
    """Read `root/cifar-10-batches-py/`. Stops reading training batches once max_train images are in hand;
    test_only skips them (the training split is then empty)."""
    return read_layout(Path(root) / LAYOUT, "cifar10", max_train, max_test, test_only)


def read_layout(folder: Path, name: str, max_train: int = 0, max_test: int = 0, test_only: bool = False) -> Dataset:
    """Read any folder in the CIFAR-10 python layout (data_batch_1..5, test_batch, batches.meta) as dataset
    `name`: the one reader behind every file-based dataset."""
    folder = Path(folder)
    class_names = read_class_names(folder / META_FILE)
    parts: list[Split] = []
    for file in () if test_only else TRAIN_FILES:
        parts.append(read_batch(folder / file))
        if max_train and sum(map(len, parts)) >= max_train:
            break
    train = _concat(parts).head(max_train) if parts else _empty_split()
    test = read_batch(folder / TEST_FILE).head(max_test)
    return Dataset(name, train, test, class_names, str(folder))


def write_batch(path: Path, split: Split, *, bytes_keys: bool = True, label: str = "batch") -> None:
    """Write a split in the CIFAR-10 python layout (protocol-2 pickle). Used by tests and tools that make data."""
    data = np.ascontiguousarray(split.images.transpose(0, 3, 1, 2)).reshape(len(split), IMAGE_BYTES)
    d = {
        "batch_label": label,
        "labels": [int(x) for x in split.labels],
        "data": data,
        "filenames": [f"{i:05d}.png" for i in range(len(split))],
    }
    if bytes_keys:
        d = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in d.items()}
    with open(path, "wb") as fh:
        pickle.dump(d, fh, protocol=2)


def write_meta(path: Path, class_names: tuple[str, ...], *, bytes_keys: bool = True) -> None:
    names: list[Any] = [n.encode() for n in class_names] if bytes_keys else list(class_names)
    d: dict[Any, Any] = {"label_names": names, "num_cases_per_batch": 10000, "num_vis": IMAGE_BYTES}
    if bytes_keys:
        d = {k.encode(): v for k, v in d.items()}
    with open(path, "wb") as fh:
        pickle.dump(d, fh, protocol=2)


# ---------------------------------------------------------------------------------------------------------------
# Download


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks (the archive is 170 MB, checkpoints ~90 MB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a .tar.gz into target, refusing (before writing anything) any member that would land outside it,
    links, devices and other special files."""
    target = target.resolve()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                dest = (target / m.name).resolve()
                if not (m.isfile() or m.isdir()) or not dest.is_relative_to(target):
                    raise DataError(f"{archive}: refusing to extract unsafe member {m.name!r}")
            # filter="data" is the standard library's own guard (PEP 706), kept as a second line of defence.
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{archive}: not a valid .tar.gz archive ({exc})") from None
    except OSError as exc:  # disk full, file size limit, permissions: the archive is fine, the target is not
        raise DataError(
            f"{archive}: extracting into {target} failed ({exc.strerror or exc}); free space or "
            "choose another data_dir, then run again"
        ) from None


def _writable_folder(
    data_dir: Path, layout: str = LAYOUT, purpose: str = "CIFAR-10 cannot be downloaded into it"
) -> None:
    """data_dir exists (created if need be) as a folder this process can write into, or one line says why not."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(
            f"data_dir={str(data_dir)!r} is a file, not a folder; pass the folder that holds (or "
            f"should receive) {layout}/"
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = (
            "a part of its path is a file"
            if isinstance(exc, (NotADirectoryError, FileExistsError))
            else exc.strerror or str(exc)
        )
        raise DataError(f"data_dir={str(data_dir)!r}: cannot create the folder ({why})") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise _not_writable(data_dir, "permission denied", layout, purpose)


def _not_writable(
    data_dir: Path, why: str, layout: str = LAYOUT, purpose: str = "CIFAR-10 cannot be downloaded into it"
) -> DataError:
    return DataError(
        f"data_dir={str(data_dir)!r} is not writable ({why}), so {purpose}; choose a writable "
        f"folder, or copy {layout}/ there"
    )


def _extract_atomically(archive: Path, data_dir: Path) -> None:
    """Extract into a temporary folder beside the target, then rename the layout into place: a failure part-way
    (disk full) leaves no half-written layout for the next run to mistake for a complete one."""
    staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=".extract-"))
    try:
        safe_extract(archive, staging)
        if not (staging / LAYOUT).is_dir():
            raise DataError(f"{archive}: archive did not contain a '{LAYOUT}' folder")
        try:
            os.rename(staging / LAYOUT, data_dir / LAYOUT)
        except OSError:
            if not (data_dir / LAYOUT).is_dir():  # else another process finished first: its copy is complete
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_cifar10(data_dir: Path, url: str | None = None, md5: str = CIFAR10_MD5, timeout: float = 30.0) -> Path:
    """Download the CIFAR-10 archive with a progress bar, check its MD5, extract it safely into data_dir."""
    from tqdm import tqdm

    url = url or os.environ.get(URL_ENV) or CIFAR10_URL
    data_dir = Path(data_dir)
    _writable_folder(data_dir)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=data_dir, suffix=".tar.gz.part")
    except OSError as exc:
        raise _not_writable(data_dir, exc.strerror or str(exc)) from None
    tmp = Path(tmp_name)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10 download") as bar:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(
                f"could not download CIFAR-10 from {url} ({reason}); offline? copy the extracted "
                f"'{LAYOUT}' folder to {data_dir / LAYOUT}, or run with dataset=synthetic"
            ) from None
        got = file_digest(tmp)
        if got != md5:
            raise DataError(f"{url}: downloaded archive has MD5 {got}, expected {md5}; not extracting it")
        _extract_atomically(tmp, data_dir)
    finally:
        tmp.unlink(missing_ok=True)
    return data_dir / LAYOUT


# ---------------------------------------------------------------------------------------------------------------
# Digits: a real image set that needs no download

DIGITS_SCALE = 4  # 8x8 -> 32x32, the input size of every model here


def digits_splits() -> tuple[Split, Split]:
    """scikit-learn's handwritten digits as 32x32 RGB uint8: ink counts 0-16 scaled to 0-255, upscaled 4x
    bilinearly (smooth strokes, as a photographed digit would have, rather than 4x4 blocks), grey in all three
    channels. Test = 30 images per class drawn with a fixed seed, train = the other 1,497; both keep
    scikit-learn's order."""
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = 8 * DIGITS_SCALE
    big = np.stack(
        [
            cv2.resize(img.astype(np.float32) * (255.0 / 16.0), (size, size), interpolation=cv2.INTER_LINEAR)
            for img in digits.images
        ]
    )
    grey = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    images = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=3))
    labels = digits.target.astype(np.int64)
    is_test = digits_test_mask(labels)
    return Split(images[~is_test], labels[~is_test]), Split(images[is_test], labels[is_test])


def digits_test_mask(labels: np.ndarray) -> np.ndarray:
    """Which of scikit-learn's digits are in the test split: 30 per class, drawn with a fixed seed."""
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    is_test = np.zeros(len(labels), bool)
    for c in range(NUM_CLASSES):
        is_test[rng.choice(np.flatnonzero(labels == c), DIGITS_TEST_PER_CLASS, replace=False)] = True
    return is_test


def write_layout(folder: Path, train: Split, test: Split, class_names: tuple[str, ...]) -> Path:
    """Write a dataset into `folder` in the CIFAR-10 python layout: the training split spread over the five
    data_batch files, the test split in test_batch, class names in batches.meta. Written into a temporary sibling
    folder and renamed into place, so an interrupted write never leaves a half-written layout behind."""
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        bounds = np.linspace(0, len(train), len(TRAIN_FILES) + 1).astype(int)
        for i, name in enumerate(TRAIN_FILES):
            part = Split(train.images[bounds[i] : bounds[i + 1]], train.labels[bounds[i] : bounds[i + 1]])
            write_batch(tmp / name, part, label=f"training batch {i + 1} of {len(TRAIN_FILES)}")
        write_batch(tmp / TEST_FILE, test, label="testing batch 1 of 1")
        write_meta(tmp / META_FILE, class_names)
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent writer that finished first with the same content
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_digits(root: Path) -> Path:
    """Create `root/digits-batches-py/` from scikit-learn's bundled digits (offline, about a second)."""
    root, purpose = Path(root), "the digits set cannot be written into it"
    _writable_folder(root, DIGITS_LAYOUT, purpose)
    try:
        return write_layout(root / DIGITS_LAYOUT, *digits_splits(), DIGITS_CLASSES)
    except OSError as exc:  # disk full, quota: nothing half-written is left (write_layout)
        raise _not_writable(root, exc.strerror or str(exc), DIGITS_LAYOUT, purpose) from None


# ---------------------------------------------------------------------------------------------------------------
# Synthetic stand-in

_PALETTE = np.array(
    [
        [220, 40, 40],
        [40, 200, 60],
        [50, 80, 230],
        [235, 220, 40],
        [220, 50, 220],
        [40, 220, 230],
        [250, 140, 20],
        [140, 50, 200],
        [245, 245, 245],
        [160, 250, 40],
    ],
    np.float32,
)
_YY, _XX = np.mgrid[0:32, 0:32].astype(np.float32)


def _shape_mask(cls: int, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    ax, ay, d = np.abs(dx), np.abs(dy), np.hypot(dx, dy)
    masks = (
        d <= r,  # disc
        (ax <= r * 0.85) & (ay <= r * 0.85),  # square
        (dy <= r * 0.7) & (dy >= -r) & (ax <= (dy + r) * 0.6),  # triangle
        (ax <= r * 0.3) & (ay <= r) | (ay <= r * 0.3) & (ax <= r),  # cross
        (d <= r) & (d >= r * 0.55),  # ring
        (ay <= r * 0.35) & (ax <= r * 1.2),  # horizontal bar
        (ax <= r * 0.35) & (ay <= r * 1.2),  # vertical bar
        ax + ay <= r,  # diamond
        (np.abs(dx - dy) <= r * 0.35) & (d <= r) | (np.abs(dx + dy) <= r * 0.35) & (d <= r),  # x
        (np.maximum(ax, ay) <= r) & (np.maximum(ax, ay) >= r * 0.65),  # square frame
    )
    return masks[cls]


def make_synthetic(n: int, seed: int) -> Split:
    """n deterministic 32x32 RGB images of 10 classes: a class-specific shape in a class-specific colour, with
    random position, size, colour jitter, background and pixel noise. The first k images are the same for any
    n >= k (one sequential generator), so max_*_samples picks a prefix exactly as it does for CIFAR-10."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 32, 32, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        cls = int(rng.integers(NUM_CLASSES))
        cx, cy = rng.uniform(11, 21, size=2)
        r = rng.uniform(6, 10)
        background = rng.uniform(20, 140, size=3).astype(np.float32)
        colour = np.clip(_PALETTE[cls] + rng.normal(0, 25, size=3), 0, 255).astype(np.float32)
        img = np.broadcast_to(background, (32, 32, 3)).copy()
        img[_shape_mask(cls, cx, cy, r)] = colour
        img += rng.normal(0, 18, size=img.shape).astype(np.float32)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        labels[i] = cls
    return Split(images, labels)


def synthetic_dataset(max_train: int = 0, max_test: int = 0, test_only: bool = False) -> Dataset:
    n_train = 0 if test_only else max_train or SYNTHETIC_SIZES["train"]
    n_test = max_test or SYNTHETIC_SIZES["test"]
    # Fixed seeds, independent of the training seed: the dataset is the same for every run.
    return Dataset(
        "synthetic",
        make_synthetic(min(n_train, SYNTHETIC_SIZES["train"]), 1234),
        make_synthetic(min(n_test, SYNTHETIC_SIZES["test"]), 5678),
        SYNTHETIC_CLASSES,
        "synthetic",
    )


def load_dataset(
    name: str,
    data_dir: str | Path,
    max_train: int = 0,
    max_test: int = 0,
    download: Callable[[Path], Path] = download_cifar10,
    test_only: bool = False,
) -> Dataset:
    """The dataset a run asks for; downloads CIFAR-10 (or builds digits) first if its layout is missing from
    data_dir. test_only: read only the test split (analysis), leaving the training split empty."""
    if name == "synthetic":
        return synthetic_dataset(max_train, max_test, test_only)
    layouts = {"cifar10": (LAYOUT, download), "digits": (DIGITS_LAYOUT, build_digits)}
    if name not in layouts:
        raise DataError(f"dataset={name!r} is not allowed: expected one of {', '.join(layouts)}, synthetic")
    folder_name, make = layouts[name]
    root = Path(data_dir)
    folder = root / folder_name
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file; the {name} python layout is a folder of that name")
    if not folder.is_dir():
        make(root)
    return read_layout(folder, name, max_train, max_test, test_only)


def channel_stats(images: np.ndarray, chunk: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, as fractions of 255 (the scale the model receives)."""
    n = images.shape[0] * images.shape[1] * images.shape[2]
    s = np.zeros(3, np.float64)
    s2 = np.zeros(3, np.float64)
    for i in range(0, len(images), chunk):
        block = images[i : i + chunk].astype(np.float64) / 255.0
        s += block.sum(axis=(0, 1, 2))
        s2 += (block**2).sum(axis=(0, 1, 2))
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
    return tuple(round(float(x), 6) for x in mean), tuple(round(float(x), 6) for x in std)


def array_digest(split: Split) -> str:
    """Short content hash of a split (images and labels), for the MLflow dataset input."""
    h = hashlib.md5()
    h.update(split.images.tobytes())
    h.update(split.labels.tobytes())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# Loaders


def _mix(*parts: int) -> int:
    """A deterministic 32-bit seed from several integers."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class EpochSampler:
    """Yields keys `epoch * n + index`: a (seed, epoch)-determined permutation, with the epoch encoded so that the
    dataset can seed augmentation per batch. Augmentation then depends only on (seed, epoch, batch), not on the
    number of workers or on which worker runs a batch, and a resumed run sees exactly the same images.

    Data-parallel (world > 1): every process draws the same permutation and takes every world-th index from
    position `rank`, so the shards never overlap. Training drops the permutation's last n % world indices (as
    torch's DistributedSampler with drop_last=True): every process then runs the same number of steps.
    Evaluation keeps every index (shards may differ by one; evaluation has no collective per batch)."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.rank, self.world = rank, world
        self.used = n - n % world if shuffle else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.used, self.world))

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng(_mix(self.seed, self.epoch)).permutation(self.n)
        else:
            order = np.arange(self.n)
        return iter((order[: self.used][self.rank :: self.world] + self.epoch * self.n).tolist())


class SplitDataset:
    """Map-style dataset over one split that returns whole batches (`__getitems__`), already collated as
    (uint8 images (B, 32, 32, 3), int64 labels (B,)) tensors; the optional albumentations transform is reseeded
    once per batch from (seed, epoch, first key)."""

    def __init__(self, split: Split, transform: Any = None, seed: int = 0) -> None:
        self.split, self.transform, self.seed = split, transform, seed

    def __len__(self) -> int:
        return len(self.split)

    def _reseed(self, first_key: int) -> None:
        # One distinct seed per transform: albumentations' own set_random_seed gives all children the same one.
        seq = np.random.SeedSequence([self.seed & 0xFFFFFFFF, first_key & 0xFFFFFFFF, first_key >> 32])
        seeds = seq.generate_state(len(self.transform.transforms) + 1)
        self.transform.set_random_seed(int(seeds[0]))
        for t, s in zip(self.transform.transforms, seeds[1:]):
            t.set_random_seed(int(s))

    def __getitems__(self, keys: list[int]) -> tuple[Any, Any]:
        import torch

        idx = np.asarray(keys, dtype=np.int64) % len(self.split)
        images = self.split.images[idx]
        if self.transform is not None:
            self._reseed(int(keys[0]))
            images = np.stack([self.transform(image=img)["image"] for img in images])
        return torch.from_numpy(images), torch.from_numpy(self.split.labels[idx])

    def __getitem__(self, key: int) -> tuple[Any, Any]:
        images, labels = self.__getitems__([key])
        return images[0], labels[0]


def _collated(batch: Any) -> Any:
    """collate_fn for SplitDataset: its batches come back collated already."""
    return batch


def _worker_init(_: int) -> None:
    # Each worker is one process doing tiny images: OpenCV's and torch's own thread pools only add contention.
    import signal

    import cv2
    import torch

    cv2.setNumThreads(0)
    torch.set_num_threads(1)
    # A forked worker inherits the entry point's SIGINT/SIGTERM handlers (cifar_mlflow.stop), there to end the
    # MLflow run KILLED; a worker has no run to end: SIGTERM (torch's terminate() at shutdown) just stops it, and
    # Ctrl-C gets Python's KeyboardInterrupt, which torch's worker loop expects.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def shutdown_workers(loader: Any) -> None:
    """Stop a loader's persistent worker processes now, instead of at interpreter exit or garbage collection,
    where torch joins each worker with a 5 s timeout: with many workers that is minutes between the last epoch
    and the run's end. A no-op for loaders without workers."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def auto_num_workers(requested: int, processes: int = 1) -> int:
    """-1 means one worker per spare core (cores minus the one the training loop uses), capped at 8: augmenting
    32x32 images runs at ~10k images/s per core, so a few workers out-pace any device here. With several
    training processes on the machine (data-parallel), each gets its share of the cores."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(processes, 1) - 1))


def make_loader(
    split: Split,
    *,
    batch_size: int,
    train: bool,
    transform: Any = None,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Any:
    """A DataLoader over a split (over this process's shard of it when world > 1; batch_size is then per
    process). Training: shuffled per epoch, augmented, last partial batch dropped when the shard holds more than
    one batch (a batch of 1 would break BatchNorm). Evaluation: in order, every sample of the shard."""
    from torch.utils.data import DataLoader

    sampler = EpochSampler(len(split), seed, shuffle=train, rank=rank, world=world)
    return DataLoader(
        SplitDataset(split, transform if train else None, seed),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(sampler) > batch_size,
        num_workers=num_workers,
        collate_fn=_collated,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init,
        prefetch_factor=4 if num_workers > 0 else None,
    )
