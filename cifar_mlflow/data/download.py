"""Get CIFAR-10: download the archive (URL_ENV names a mirror), check its MD5, extract it safely and atomically
into data_dir.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from cifar_mlflow.data.data_dir import not_writable, writable_folder
from cifar_mlflow.data.layout import LAYOUT
from cifar_mlflow.data.stats import file_digest
from cifar_mlflow.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# A mirror serving the same archive can be named here; the MD5 is checked all the same.
URL_ENV = "CIFAR_MLFLOW_CIFAR10_URL"


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
    writable_folder(data_dir)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=data_dir, suffix=".tar.gz.part")
    except OSError as exc:
        raise not_writable(data_dir, exc.strerror or str(exc)) from None
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
