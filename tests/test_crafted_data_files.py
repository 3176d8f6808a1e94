"""Data files a hostile or careless producer writes: crafted array states in a CIFAR-10 pickle (which once crashed
the process), mutated pickles, a data_dir that cannot hold the data, a disk filling up while extracting. Each is
one line for the user (no traceback), and a run that had opened ends FAILED with the reason."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from cifar_mlflow import data
from tests.conftest import REPO, TINY, child_env, cli_args, one_line


@pytest.fixture(scope="module", autouse=True)
def store(module_store):
    """One store for the module (every test's, so none falls back to ./mlflow.db)."""
    return module_store


def _layout_copy(cifar_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(cifar_root, root)
    return root


class _Reduce:
    """Pickles as `func(*args)` followed by BUILD(state): any reduce a hostile writer can produce."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _crafted_dtype_batch(path: Path) -> None:
    """The issue's crash: only the reader's allowed globals, with a hostile dtype state passed to
    dtype.__setstate__ through BUILD (a field at offset -5, itemsize -2**63)."""
    from numpy._core.multiarray import _reconstruct

    dtype = _Reduce(np.dtype, ("u1", False, True), (4, "|", ("a", "b"), {"a": (np.dtype("u1"), -5)}, -(2**63), 1))
    array = _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (4, 3072), dtype, False, b"\0" * 4 * 3072))
    with open(path, "wb") as fh:
        pickle.dump({b"data": array, b"labels": [0] * 4}, fh, protocol=2)


def test_crafted_dtype_state_fails_the_run_in_one_line(store, cifar_root, tmp_path):
    """In a process of its own, as `mlflow run` starts it (MLFLOW_RUN_ID set): a regression crashes that process,
    not the suite."""
    root = _layout_copy(cifar_root, tmp_path)
    path = root / data.LAYOUT / "data_batch_1"
    _crafted_dtype_batch(path)
    client = MlflowClient(store.uri)
    run_id = client.create_run(client.get_experiment_by_name(store.experiment).experiment_id).info.run_id
    cmd = [sys.executable, "-m", "entrypoints.train", *cli_args({**TINY, "data_dir": root})]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=store.env(MLFLOW_RUN_ID=run_id, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = (
        f"error: {path}: not a readable CIFAR-10 pickle (refusing a u1 dtype whose pickled state is not "
        "numpy's plain one)"
    )
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1:]) == (1, [line]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == line.removeprefix("error: ")


# Other crafted states, each read in a fresh process (a crash there fails the test, not the suite).
_READ_SCRIPT = """
import sys
from pathlib import Path
from cifar_mlflow import data
for name in sys.argv[1:]:
    try:
        data.read_batch(Path(name))
        print("read", name)
    except data.DataError as exc:
        print(exc)
"""


def _crafted_variants(folder: Path) -> dict[str, str]:
    """file name -> the reason the reader gives."""
    from numpy._core.multiarray import _reconstruct, scalar

    plain = (3, "|", None, None, None, -1, -1, 0)
    u1 = _Reduce(np.dtype, ("u1", False, True), plain)
    cases = {
        "structured-dtype": (
            {b"data": _Reduce(np.dtype, ("V8", False, True), plain)},
            "refusing dtype 'V8': only plain numeric arrays are read",
        ),
        "object-dtype": (
            {b"data": _Reduce(np.dtype, ("O", False, True), plain)},
            "refusing dtype 'O': only plain numeric arrays are read",
        ),
        "short-buffer": (
            {b"data": _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2**40, 3072), u1, False, b"\0" * 8))},
            f"an array of shape {(2**40, 3072)} needs {2**40 * 3072} bytes, the file holds 8",
        ),
        "ndarray-called": ({b"data": _Reduce(np.ndarray, ((2, 2),))}, "refusing to call numpy.ndarray directly"),
        "scalar-wrong-size": (
            {
                b"labels": [
                    _Reduce(
                        scalar, (_Reduce(np.dtype, ("i8", False, True), (3, "<", None, None, None, -1, -1, 0)), b"12")
                    )
                ]
            },
            "refusing a numpy scalar whose bytes do not match its dtype",
        ),
    }
    for name, (obj, _) in cases.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    return {name: reason for name, (_, reason) in cases.items()}


def test_other_crafted_array_states_are_refused(tmp_path):
    expected = _crafted_variants(tmp_path)
    names = [str(tmp_path / n) for n in expected]
    proc = subprocess.run(
        [sys.executable, "-c", _READ_SCRIPT, *names],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        f"{tmp_path / n}: not a readable CIFAR-10 pickle ({reason})" for n, reason in expected.items()
    ]


def test_the_plain_states_real_files_use_still_read(tmp_path):
    """uint8 data and int labels, as a list and as an int64 array, written by numpy's own pickling."""
    split = data.make_synthetic(6, seed=1)
    data.write_batch(tmp_path / "as-list", split)
    batch = {
        b"data": np.ascontiguousarray(split.images.transpose(0, 3, 1, 2)).reshape(6, 3072),
        b"labels": split.labels.astype("<i8"),
    }
    with open(tmp_path / "as-array", "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    for name in ("as-list", "as-array"):
        got = data.read_batch(tmp_path / name)
        np.testing.assert_array_equal(got.images, split.images)
        np.testing.assert_array_equal(got.labels, split.labels)
        assert got.images.flags.writeable and got.labels.dtype == np.int64


def _mutated(folder: Path, kind: str) -> Path:
    import struct

    if kind == "lookup":  # a bytes value "encoded" with a codec that does not exist
        body = b"\x80\x02}(C\x04datac_codecs\nencode\nX\x01\x00\x00\x00aX\x07\x00\x00\x00nocodec\x86Ru."
        path = folder / "data_batch_1"
    elif kind == "memory":  # BINBYTES8 claiming 2**62 bytes
        body = b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"xx"
        path = folder / "data_batch_1"
    else:  # label_names nested 100,000 lists deep
        body = b"\x80\x02}X\x0b\x00\x00\x00label_names" + b"]" * 100_000 + b"a" * 99_999 + b"s."
        path = folder / data.META_FILE
    path.write_bytes(body)
    return path


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("lookup", "not a readable CIFAR-10 pickle (refusing _codecs.encode(..., 'nocodec'))"),
        ("memory", "not a readable CIFAR-10 pickle (MemoryError)"),
        ("deep", "'label_names' must list 10 class names (strings), got a list of length 1"),
    ],
    ids=["lookup", "memory", "deep"],
)
def test_mutated_pickles_are_one_line_data_errors(cifar_root, tmp_path, kind, reason):
    root = _layout_copy(cifar_root, tmp_path)
    path = _mutated(root / data.LAYOUT, kind)
    assert one_line(cli_args({**TINY, "data_dir": root})) == f"{path}: {reason}"


@pytest.mark.parametrize("kind", ["file", "under-a-file", "unwritable"])
def test_data_dir_that_cannot_hold_the_data(tmp_path, kind, monkeypatch):
    monkeypatch.setenv(data.URL_ENV, "http://127.0.0.1:9/never-downloaded.tar.gz")
    (tmp_path / "a-file").write_text("not a folder")
    path = {"file": tmp_path / "a-file", "under-a-file": tmp_path / "a-file" / "data", "unwritable": Path("/sys")}[kind]
    message = one_line(cli_args({**TINY, "data_dir": path}))
    expected = {
        "file": f"data_dir='{path}' is a file, not a folder; pass the folder that holds (or should receive) "
        "cifar-10-batches-py/",
        "under-a-file": f"data_dir='{path}': cannot create the folder (a part of its path is a file)",
        # root ignores permission bits; /sys refuses new files even to root, as a read-only share would
        "unwritable": "data_dir='/sys' is not writable (Permission denied), so CIFAR-10 cannot be downloaded into "
        "it; choose a writable folder, or copy cifar-10-batches-py/ there",
    }[kind]
    assert message == expected


_EXTRACT_UNDER_A_LIMIT = """
import resource, sys
from cifar_mlflow import data
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))   # writes past `limit` bytes fail: a disk filling up
try:
    data.download_cifar10(sys.argv[1], url=sys.argv[2], md5=sys.argv[4])
except data.DataError as exc:
    print(exc)
"""


def test_disk_full_while_extracting_leaves_nothing_half_written(tmp_path):
    """Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG: the archive (zeros, a few KB) is
    written whole, each extracted batch (200 KB) is not."""
    import hashlib

    src = tmp_path / "src"
    zeros = data.Split(np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64, np.int64))
    (src / data.LAYOUT).mkdir(parents=True)
    for name in (*data.TRAIN_FILES, data.TEST_FILE):
        data.write_batch(src / data.LAYOUT / name, zeros)
    data.write_meta(src / data.LAYOUT / data.META_FILE, data.SYNTHETIC_CLASSES)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / data.LAYOUT, arcname=data.LAYOUT)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    target = tmp_path / "target"

    proc = subprocess.run(
        [sys.executable, "-c", _EXTRACT_UNDER_A_LIMIT, str(target), archive.as_uri(), "100000", md5],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.splitlines()
    assert line.endswith("failed (File too large); free space or choose another data_dir, then run again"), line
    assert sorted(p.name for p in target.iterdir()) == [], "a half-extracted layout (or its temp folder) was left"

    # the next run extracts again, completely
    data.download_cifar10(target, url=archive.as_uri(), md5=md5)
    assert len(data.read_cifar10(target).train) == 5 * 64
