"""The CIFAR-10 python layout on disk (data_batch_1..5, test_batch, batches.meta in one folder): its names,
reading it with validation (through the restricted unpickler) and writing it as the official files are encoded
(tests, benchmarks, the digits set).
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cifar_mlflow.data import py2_pickle
from cifar_mlflow.data.dataset import NUM_CLASSES, Dataset, Split
from cifar_mlflow.data.safe_pickle import load_pickle
from cifar_mlflow.errors import DataError

LAYOUT = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
IMAGE_BYTES = 3 * 32 * 32


def read_batch(path: Path) -> Split:
    """Read and validate one batch file: 'data' (N, 3072) uint8, 'labels' N ints in 0-9."""
    d = load_pickle(path)
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
    names = load_pickle(path).get("label_names")
    # described by type and length: repr() of a crafted, deeply nested value would itself fail
    if not (isinstance(names, list) and len(names) == NUM_CLASSES and all(isinstance(n, (bytes, str)) for n in names)):
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


# How write_batch / write_meta encode a file. "python2" (the default) is the official files' encoding: Python 2's
# cPickle, protocol 2, every string a byte string (data.py2_pickle). "python3" is what Python 3's pickle.dump writes
# for the same dict with str keys at its default protocol: users write such files, and the reader takes both.
ENCODINGS = ("python2", "python3")


def _dump(path: Path, d: dict[str, Any], encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r} is not allowed: expected one of {', '.join(ENCODINGS)}")
    blob = py2_pickle.dumps(d) if encoding == "python2" else pickle.dumps(d, protocol=pickle.DEFAULT_PROTOCOL)
    Path(path).write_bytes(blob)


def write_batch(path: Path, split: Split, *, encoding: str = "python2", label: str = "batch") -> None:
    """Write a split as one CIFAR-10 batch file: the official keys in the official order, 'data' (N, 3072) uint8
    (channel planes, row-major), 'labels' a list of ints."""
    data = np.ascontiguousarray(split.images.transpose(0, 3, 1, 2)).reshape(len(split), IMAGE_BYTES)
    d = {
        "batch_label": label,
        "labels": [int(x) for x in split.labels],
        "data": data,
        "filenames": [f"{i:05d}.png" for i in range(len(split))],
    }
    _dump(path, d, encoding)


def write_meta(
    path: Path, class_names: tuple[str, ...], *, encoding: str = "python2", num_cases_per_batch: int = 10000
) -> None:
    """Write batches.meta: the class names, the images per batch and the values per image (the official keys)."""
    d = {"num_cases_per_batch": num_cases_per_batch, "label_names": list(class_names), "num_vis": IMAGE_BYTES}
    _dump(path, d, encoding)


def write_layout(
    folder: Path,
    train: Split,
    test: Split,
    class_names: tuple[str, ...],
    *,
    encoding: str = "python2",
    test_label: str = "testing batch 1 of 1",
) -> Path:
    """Write a dataset into `folder` in the CIFAR-10 python layout, encoded as the official files are (or as
    `encoding` says): the training split spread over the five data_batch files, the test split in test_batch,
    class names in batches.meta. Written into a temporary sibling folder and renamed into place, so an
    interrupted write never leaves a half-written layout behind."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        bounds = np.linspace(0, len(train), len(TRAIN_FILES) + 1).astype(int)
        for i, name in enumerate(TRAIN_FILES):
            part = Split(train.images[bounds[i] : bounds[i + 1]], train.labels[bounds[i] : bounds[i + 1]])
            write_batch(tmp / name, part, encoding=encoding, label=f"training batch {i + 1} of {len(TRAIN_FILES)}")
        write_batch(tmp / TEST_FILE, test, encoding=encoding, label=test_label)
        write_meta(tmp / META_FILE, class_names, encoding=encoding, num_cases_per_batch=int(bounds[1] - bounds[0]))
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent writer that finished first with the same content
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
