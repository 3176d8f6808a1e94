"""data_dir, where datasets are downloaded or built: check that it is a folder this process can write a layout
into, creating it if need be, or say in one line why not.
"""

from __future__ import annotations

import os
from pathlib import Path

from cifar_mlflow.data.cifar_files import LAYOUT
from cifar_mlflow.errors import DataError


def writable_folder(
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
        raise not_writable(data_dir, "permission denied", layout, purpose)


def not_writable(
    data_dir: Path, why: str, layout: str = LAYOUT, purpose: str = "CIFAR-10 cannot be downloaded into it"
) -> DataError:
    """The one-line error for a data_dir this process cannot write into (permissions, disk full, quota)."""
    return DataError(
        f"data_dir={str(data_dir)!r} is not writable ({why}), so {purpose}; choose a writable "
        f"folder, or copy {layout}/ there"
    )
