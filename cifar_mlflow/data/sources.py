"""load_dataset: the dataset a run names (cifar10, digits or synthetic), downloaded or built first when its
layout is missing from data_dir.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cifar_mlflow.data.cifar_files import LAYOUT, read_layout
from cifar_mlflow.data.dataset import Dataset
from cifar_mlflow.data.digits import DIGITS_LAYOUT, build_digits
from cifar_mlflow.data.digits import is_current as digits_is_current
from cifar_mlflow.data.download import download_cifar10
from cifar_mlflow.data.synthetic import synthetic_dataset
from cifar_mlflow.errors import DataError


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
    # name -> (folder, how to make it, whether a folder there is one to read: digits of older versions are not)
    layouts = {
        "cifar10": (LAYOUT, download, lambda folder: True),
        "digits": (DIGITS_LAYOUT, build_digits, digits_is_current),
    }
    if name not in layouts:
        raise DataError(f"dataset={name!r} is not allowed: expected one of {', '.join(layouts)}, synthetic")
    folder_name, make, usable = layouts[name]
    root = Path(data_dir)
    folder = root / folder_name
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file; the {name} python layout is a folder of that name")
    if not folder.is_dir() or not usable(folder):
        make(root)
    return read_layout(folder, name, max_train, max_test, test_only)
