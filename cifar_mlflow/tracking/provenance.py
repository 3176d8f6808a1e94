"""What a run records about the code and libraries that made it: a digest of the code (tagged on every run; the
pipeline reuses a step only if it ran the same code) and the library versions (logged with every training run)."""

from __future__ import annotations

import functools
import sys
from importlib import metadata
from pathlib import Path

CODE_VERSION_TAG = "code_version"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # cifar_mlflow/


@functools.cache  # the files a process runs do not change under it: hash them once (the pipeline asks 4 times)
def code_version() -> str:
    """A digest of the code a run executes (this package, the entry points, MLproject and the pins), tagged on
    every run: the pipeline reuses a step only if it ran the same code. Unlike the git commit it also sees
    uncommitted edits, and it exists where there is no git checkout."""
    import hashlib

    root = PACKAGE_DIR.parent
    files = sorted([*PACKAGE_DIR.rglob("*.py"), *(root / "entrypoints").glob("*.py")])
    files += [f for f in (root / "MLproject", root / "pyproject.toml") if f.is_file()]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Library versions logged with every run."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "torchvision", "mlflow", "albumentations", "numpy"):
        out[pkg] = metadata.version(pkg)
    return out
