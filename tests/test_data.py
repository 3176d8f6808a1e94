"""The CIFAR-10 layout reader (both key styles, corrupt files, hostile pickles), download + MD5 + safe
extraction over a real local HTTP server, the synthetic set, statistics and the loaders."""

import hashlib
import io
import os
import pickle
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cifar_mlflow import data
from cifar_mlflow.errors import DataError
from cifar_mlflow.training import augment
from tests.conftest import write_cifar_layout

# ---------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("encoding", data.ENCODINGS)
def test_reader_accepts_both_encodings(tmp_path, encoding):
    """The official files' encoding (Python 2 byte strings) and Python 3's; every producer's bytes are compared
    with pickle.load(encoding="bytes") in test_cifar_files.py."""
    write_cifar_layout(tmp_path, train_per_batch=8, test_images=6, encoding=encoding)
    ds = data.read_cifar10(tmp_path)
    assert ds.train.images.shape == (40, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (6, 32, 32, 3) and ds.train.labels.dtype == np.int64
    assert ds.class_names == data.SYNTHETIC_CLASSES
    # the HWC conversion is exact: the same pixels the generator made
    expected = data.make_synthetic(40, seed=11)
    np.testing.assert_array_equal(ds.train.images, expected.images)
    np.testing.assert_array_equal(ds.train.labels, expected.labels)


def test_max_samples_takes_a_prefix_and_reads_only_needed_batches(tmp_path):
    write_cifar_layout(tmp_path, train_per_batch=8, test_images=6)
    (tmp_path / data.LAYOUT / "data_batch_5").write_bytes(b"garbage")  # never read for 10 images
    ds = data.read_cifar10(tmp_path, max_train=10, max_test=4)
    assert len(ds.train) == 10 and len(ds.test) == 4
    np.testing.assert_array_equal(ds.train.labels, data.make_synthetic(10, seed=11).labels)


def _corrupt(folder: Path, name: str, obj) -> Path:
    path = folder / data.LAYOUT / name
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)
    return path


@pytest.fixture
def layout(tmp_path):
    write_cifar_layout(tmp_path, train_per_batch=8, test_images=6)
    return tmp_path


def _ok_batch(n=4):
    return {b"data": np.zeros((n, 3072), np.uint8), b"labels": [0] * n}


@pytest.mark.parametrize(
    "name, obj, message",
    [
        (
            "data_batch_2",
            {**_ok_batch(), b"data": np.zeros((4, 3000), np.uint8)},
            "'data' must be a (N, 3072) uint8 array, got shape (4, 3000)",
        ),
        ("data_batch_2", {**_ok_batch(), b"data": np.zeros((4, 3072), np.float32)}, "dtype float32"),
        ("test_batch", {**_ok_batch(), b"labels": [0, 1, 10, 2]}, "label 10 is outside 0-9"),
        ("test_batch", {**_ok_batch(), b"labels": [0, -1, 2, 2]}, "label -1 is outside 0-9"),
        ("data_batch_3", {**_ok_batch(), b"labels": [0, 1]}, "4 images but 'labels' has shape (2,)"),
        ("data_batch_1", [1, 2, 3], "expected a dict, got list"),
        ("batches.meta", {b"label_names": [b"a", b"b"]}, "'label_names' must list 10 class names"),
    ],
)
def test_corrupt_files_are_named_in_the_error(layout, name, obj, message):
    path = _corrupt(layout, name, obj)
    with pytest.raises(DataError) as err:
        data.read_cifar10(layout)
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_truncated_pickle(layout):
    path = layout / data.LAYOUT / "data_batch_4"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"data_batch_4: not a readable CIFAR-10 pickle"):
        data.read_cifar10(layout)


def test_missing_file(layout):
    (layout / data.LAYOUT / "test_batch").unlink()
    with pytest.raises(DataError, match=r"test_batch: file is missing"):
        data.read_cifar10(layout)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_planted_pickle_payload_is_refused_not_executed(layout, monkeypatch):
    monkeypatch.chdir(layout)
    _corrupt(layout, "data_batch_1", {b"data": _Payload(), b"labels": []})
    with pytest.raises(DataError, match=r"refusing to load posix.system"):
        data.read_cifar10(layout)
    assert not (layout / "PWNED").exists()


def test_load_dataset_downloads_only_when_layout_missing(layout, tmp_path_factory):
    calls = []
    assert len(data.load_dataset("cifar10", layout, download=calls.append).train) == 40
    assert calls == []
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError):  # the stand-in downloader "succeeds" without writing: reading then fails
        data.load_dataset("cifar10", empty, download=calls.append)
    assert calls == [empty]


# ---------------------------------------------------------------------------------------------- download


def _tar_of(folder: Path, out: Path) -> str:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=data.LAYOUT)
    return hashlib.md5(out.read_bytes()).hexdigest()


def test_download_checks_md5_and_extracts(http_dir, layout, tmp_path):
    www, base = http_dir
    md5 = _tar_of(layout / data.LAYOUT, www / "cifar.tar.gz")
    target = tmp_path / "dl"
    data.download_cifar10(target, url=f"{base}/cifar.tar.gz", md5=md5)
    assert len(data.read_cifar10(target).train) == 40
    assert [p.name for p in target.iterdir()] == [data.LAYOUT], "no partial download left behind"


def test_download_with_wrong_md5_is_refused_before_extracting(http_dir, layout, tmp_path):
    www, base = http_dir
    _tar_of(layout / data.LAYOUT, www / "cifar.tar.gz")
    target = tmp_path / "dl"
    with pytest.raises(DataError, match=rf"has MD5 [0-9a-f]{{32}}, expected {data.CIFAR10_MD5}"):
        data.download_cifar10(target, url=f"{base}/cifar.tar.gz")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/abs-escape.txt", "cifar-10-batches-py/../../up.txt"])
def test_archive_members_cannot_escape_the_target(http_dir, tmp_path, member):
    www, base = http_dir
    archive = www / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    target = tmp_path / "a" / "b" / "dl"
    with pytest.raises(DataError, match="refusing to extract unsafe member"):
        data.download_cifar10(target, url=f"{base}/evil.tar.gz", md5=hashlib.md5(archive.read_bytes()).hexdigest())
    assert list(target.iterdir()) == []
    assert not any(p.name.endswith("escape.txt") or p.name == "up.txt" for p in tmp_path.rglob("*"))


def test_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="unsafe member"):
        data.safe_extract(archive, tmp_path / "out")


def test_offline_download_gives_one_clear_error(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as err:
        data.download_cifar10(tmp_path, url=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz", timeout=5)
    msg = str(err.value)
    assert "could not download CIFAR-10" in msg and str(tmp_path / data.LAYOUT) in msg and "dataset=digits" in msg
    assert "\n" not in msg and list(tmp_path.iterdir()) == []


def test_official_url_and_md5_are_kept():
    assert data.CIFAR10_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert data.CIFAR10_MD5 == "c58f30108f718f92721af3b95e74349a"


# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    data.load_dataset("digits", root)  # builds root/digits-batches-py once
    return root


def test_digits_is_written_in_the_cifar_layout_and_read_by_the_same_reader(digits_root):
    folder = digits_root / data.DIGITS_LAYOUT
    assert sorted(p.name for p in folder.iterdir()) == sorted([*data.TRAIN_FILES, data.TEST_FILE, data.META_FILE])
    assert [p.name for p in digits_root.iterdir()] == [data.DIGITS_LAYOUT], "no temporary folder left behind"
    assert [len(data.read_batch(folder / f)) for f in data.TRAIN_FILES] == [299, 299, 300, 299, 300]
    ds = data.load_dataset("digits", digits_root)
    assert (ds.name, len(ds.train), len(ds.test), ds.source) == ("digits", 1497, 300, str(folder))
    assert ds.class_names == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert ds.train.images.shape == (1497, 32, 32, 3) and ds.train.images.dtype == np.uint8
    # grey in three channels, full 0-255 range, every class in both splits
    assert np.array_equal(ds.train.images[..., 0], ds.train.images[..., 2])
    assert ds.train.images.min() == 0 and ds.train.images.max() == 255
    assert np.bincount(ds.test.labels).tolist() == [30] * 10 and np.bincount(ds.train.labels).min() >= 140


def test_digits_split_is_stratified_fixed_and_disjoint(digits_root, tmp_path):
    from sklearn.datasets import load_digits

    ds = data.load_dataset("digits", digits_root)
    train, test = data.digits_splits()
    np.testing.assert_array_equal(ds.train.images, train.images)
    np.testing.assert_array_equal(ds.test.labels, test.labels)
    assert np.bincount(ds.test.labels).tolist() == [30] * 10
    np.testing.assert_array_equal(np.bincount(ds.train.labels) + 30, np.bincount(load_digits().target))
    assert not {im.tobytes() for im in ds.test.images} & {im.tobytes() for im in ds.train.images}
    again = data.load_dataset("digits", tmp_path)
    np.testing.assert_array_equal(again.train.images, ds.train.images)
    np.testing.assert_array_equal(again.test.images, ds.test.images)
    # the 4x bilinear upscale keeps each 8x8 block's ink: block means track scikit-learn's 0-16 counts
    digits = load_digits()
    is_test = data.digits_test_mask(digits.target)
    for split, images in ((ds.train, digits.images[~is_test]), (ds.test, digits.images[is_test])):
        blocks = split.images[..., 0].reshape(len(split), 8, 4, 8, 4).mean(axis=(2, 4))
        assert np.corrcoef(blocks.ravel(), images.ravel())[0, 1] > 0.97


def test_digits_is_built_only_when_missing(digits_root):
    folder = digits_root / data.DIGITS_LAYOUT
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    data.load_dataset("digits", digits_root, max_train=10, max_test=5)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_digits_folder_an_older_version_built_is_rebuilt_with_todays_split(tmp_path, capsys):
    """Before 2026-11-23 the digits test split was scikit-learn's last 300 images, written as Python 3 pickles
    labelled "testing batch 1 of 1": such a folder in data_dir would silently give other test figures."""
    train, test = data.digits_splits()
    images, labels = np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels])
    old = data.write_layout(
        tmp_path / data.DIGITS_LAYOUT,
        data.Split(images[:-300], labels[:-300]),
        data.Split(images[-300:], labels[-300:]),
        data.DIGITS_CLASSES,
        encoding="python3",
    )
    assert not data.digits_is_current(old)
    ds = data.load_dataset("digits", tmp_path)
    assert (
        "was built by an older cifar-mlflow (its test batch does not name today's split rule); rebuilding it"
        in capsys.readouterr().err
    )
    np.testing.assert_array_equal(ds.test.labels, test.labels)
    np.testing.assert_array_equal(ds.test.images, test.images)
    assert data.digits_is_current(old) and [p.name for p in tmp_path.iterdir()] == [data.DIGITS_LAYOUT]


def test_an_interrupted_digits_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cifar_mlflow.data.cifar_files.write_meta", disk_full)  # where write_layout finds it
    with pytest.raises(
        DataError,
        match=r"is not writable \(No space left on device\), so the digits set cannot "
        r"be written into it; choose a writable folder",
    ):
        data.load_dataset("digits", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_digits_into_a_data_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(
        DataError,
        match=r"is a file, not a folder; pass the folder that holds \(or should receive\) "
        r"digits-batches-py/",
    ):
        data.load_dataset("digits", tmp_path / "f")


def test_digits_are_real_images_not_a_toy(digits_root):
    """Unlike the synthetic set, a nearest-class-mean classifier on raw pixels is far from perfect on digits
    (0.87 here), so accuracy above it is learned."""
    ds = data.load_dataset("digits", digits_root)
    x = ds.train.images[..., 0].reshape(len(ds.train), -1).astype(np.float32)
    means = np.stack([x[ds.train.labels == c].mean(0) for c in range(10)])
    xt = ds.test.images[..., 0].reshape(len(ds.test), -1).astype(np.float32)
    pred = np.argmin(((xt[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert 0.6 < (pred == ds.test.labels).mean() < 0.97


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_prefix_stable():
    a, b = data.make_synthetic(50, seed=3), data.make_synthetic(20, seed=3)
    np.testing.assert_array_equal(a.images[:20], b.images)
    np.testing.assert_array_equal(a.labels[:20], b.labels)
    assert not np.array_equal(a.images, data.make_synthetic(50, seed=4).images)


def test_synthetic_is_learnable_not_noise():
    """A nearest-class-mean classifier on raw pixels beats chance by far on held-out images."""
    train, test = data.make_synthetic(2000, seed=1), data.make_synthetic(500, seed=2)
    assert set(np.unique(train.labels)) == set(range(10))
    x = train.images.reshape(len(train), -1).astype(np.float32)
    means = np.stack([x[train.labels == c].mean(0) for c in range(10)])
    xt = test.images.reshape(len(test), -1).astype(np.float32)
    pred = np.argmin(((xt[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == test.labels).mean() > 0.4


def test_synthetic_dataset_sizes():
    ds = data.load_dataset("synthetic", "unused", max_train=30, max_test=10)
    assert (len(ds.train), len(ds.test), ds.class_names) == (30, 10, data.SYNTHETIC_CLASSES)


# ---------------------------------------------------------------------------------------------- stats, loaders


def test_channel_stats_match_numpy():
    images = data.make_synthetic(300, seed=5).images
    mean, std = data.channel_stats(images, chunk=70)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), atol=1e-6)


def _epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_training_loader_is_deterministic_and_independent_of_workers():
    split = data.make_synthetic(100, seed=0)
    tf = augment.build_train_transform("standard", (0.5, 0.5, 0.5))
    runs = [
        _epoch_batches(data.make_loader(split, batch_size=32, train=True, transform=tf, seed=7, num_workers=w), epoch=2)
        for w in (0, 2)
    ]
    assert len(runs[0]) == 3, "drop_last: 100 images -> 3 full batches of 32"
    for (x0, y0), (x1, y1) in zip(*runs):
        assert x0.dtype.is_floating_point is False and x0.shape == (32, 32, 32, 3)
        assert (x0 == x1).all() and (y0 == y1).all()
    other_epoch = _epoch_batches(data.make_loader(split, batch_size=32, train=True, transform=tf, seed=7), 3)
    assert not (runs[0][0][0] == other_epoch[0][0]).all()


def test_eval_loader_keeps_order_and_every_sample():
    split = data.make_synthetic(70, seed=0)
    batches = list(data.make_loader(split, batch_size=32, train=False, transform="ignored"))
    assert [len(y) for _, y in batches] == [32, 32, 6]
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in batches]), split.images)


def test_auto_num_workers_rule():
    cores = len(os.sched_getaffinity(0))
    assert data.auto_num_workers(-1) == max(0, min(8, cores - 1))
    assert data.auto_num_workers(3) == 3


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_shutdown_workers_stops_the_worker_processes_at_once():
    import time

    import psutil

    split = data.make_synthetic(64, seed=1)
    loader = data.make_loader(
        split,
        batch_size=16,
        train=True,
        seed=0,
        num_workers=2,
        transform=augment.build_train_transform("standard", (0.5,) * 3),
    )
    me = psutil.Process()
    others = {p.pid for p in me.children()}  # whatever an earlier test in this worker process left running
    loader.sampler.set_epoch(1)
    assert sum(len(y) for _, y in loader) == 64
    workers = [p for p in me.children() if p.pid not in others]
    assert len(workers) == 2, "persistent workers outlive the epoch"
    start = time.perf_counter()
    data.shutdown_workers(loader)
    assert time.perf_counter() - start < 2 and not any(_alive(p) for p in workers)
    data.shutdown_workers(loader)  # twice, or on a loader without workers: nothing happens
    data.shutdown_workers(data.make_loader(split, batch_size=16, train=False))
    loader.sampler.set_epoch(2)
    assert sum(len(y) for _, y in loader) == 64, "the loader still works: new workers start on demand"
    data.shutdown_workers(loader)
