"""Get CIFAR-10: take the archive from data_dir if the user brought it, else download it (URL_ENV names a mirror),
check its MD5, extract it safely and atomically into data_dir.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from cifar_mlflow.data.cifar_files import LAYOUT
from cifar_mlflow.data.data_dir import not_writable, writable_folder
from cifar_mlflow.data.stats import file_digest
from cifar_mlflow.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"  # the official file name: an archive of that name in data_dir is used, not fetched
# A mirror serving the same archive can be named here; the MD5 is checked all the same. A mirror of another
# archive must say which, as a pip-style fragment: URL#md5=<32 hex digits> (data is never extracted unchecked).
URL_ENV = "CIFAR_MLFLOW_CIFAR10_URL"
_MD5_FRAGMENT = re.compile(r"md5=([0-9a-f]{32})")


def source_and_md5(url: str | None = None, md5: str = CIFAR10_MD5) -> tuple[str, str]:
    """The URL to fetch (url, else URL_ENV, else the official one) and the MD5 its archive must have: the official
    one unless the URL names its own with a `#md5=` fragment."""
    url = url or os.environ.get(URL_ENV) or CIFAR10_URL
    base, sep, fragment = url.partition("#")
    if not sep:
        return url, md5
    found = _MD5_FRAGMENT.fullmatch(fragment.lower())
    if not found:
        raise DataError(
            f"{url}: the only fragment a CIFAR-10 URL may carry is #md5=<32 hex digits> (its archive's checksum), "
            f"not {fragment[:60]!r}"
        )
    return base, found.group(1)


def offline_advice(data_dir: Path) -> str:
    """What to do without internet: the built-in real images, or bringing the archive by hand."""
    return (
        f"offline? dataset=digits trains on real images that need no download (built in), or bring CIFAR-10: "
        f"copy {ARCHIVE} into {data_dir} (its MD5 is checked, then it is extracted) or its extracted '{LAYOUT}' "
        f"folder to {data_dir / LAYOUT}"
    )


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
    """Get the CIFAR-10 archive, check its MD5, extract it safely into data_dir. The archive is data_dir's own
    cifar-10-python.tar.gz when the user put one there, else downloaded with a progress bar from `url` / URL_ENV /
    the official address. Either is checked against the official MD5 (or the one a `#md5=` fragment names)."""
    from tqdm import tqdm

    url, md5 = source_and_md5(url, md5)
    data_dir = Path(data_dir)
    writable_folder(data_dir)
    brought = data_dir / ARCHIVE
    if brought.is_file():
        got = file_digest(brought)
        if got != md5:
            raise DataError(
                f"{brought} has MD5 {got}, expected {md5}; not extracting it: replace it with the archive from "
                f"{CIFAR10_URL}, or remove it to download"
            )
        _extract_atomically(brought, data_dir)
        return data_dir / LAYOUT
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
            raise DataError(f"could not download CIFAR-10 from {url} ({reason}); {offline_advice(data_dir)}") from None
        got = file_digest(tmp)
        if got != md5:
            raise DataError(f"{url}: downloaded archive has MD5 {got}, expected {md5}; not extracting it")
        _extract_atomically(tmp, data_dir)
    finally:
        tmp.unlink(missing_ok=True)
    return data_dir / LAYOUT
