"""CIFAR-10 files as their real producers write them. The official archive's batches are Python 2 cPickles
(protocol 2, every string a byte string, numpy's reduction included); users also write Python 3 pickles at
protocols 2-5. The project's writer must encode as the official files do, the reader must read every producer's
files exactly as `pickle.load(encoding="bytes")` does and still refuse what is not a plain CIFAR batch, and the
download path (an official-layout archive over HTTP, MD5, extraction, training) must work end to end."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import shutil
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from cifar_mlflow import data
from cifar_mlflow.data import py2_pickle
from cifar_mlflow.data.safe_pickle import load_pickle
from tests.conftest import TRAINED, official_archive

# A pickle Python 2.7 + numpy 1.x wrote (numpy ships it as test data: numpy/_core/tests/data/astype_copy.pkl, a
# float64 array of 73 values): a real producer's bytes, not this project's.
NUMPY_PY2_PICKLE = Path(np.__file__).parent / "_core" / "tests" / "data" / "astype_copy.pkl"


def _ops(blob: bytes) -> list[tuple[str, object]]:
    return [(op.name, arg) for op, arg, _ in pickletools.genops(blob)]


def _without_memo(ops: list[tuple[str, object]]) -> list[tuple[str, object]]:
    return [(name, arg) for name, arg in ops if name not in ("BINPUT", "LONG_BINPUT")]


# ------------------------------------------------------------------------------------------------ the writer


def test_writer_reproduces_a_pickle_python2_and_numpy_wrote_byte_for_byte():
    original = NUMPY_PY2_PICKLE.read_bytes()
    array = pickle.loads(original, encoding="bytes")
    assert array.dtype == np.float64 and array.shape == (73,)
    assert py2_pickle.dumps(array) == original


def test_a_batch_is_encoded_as_the_official_files_are(tmp_path):
    """Every opcode of a two-image batch: Python 2's byte strings for the keys, the label and file names, numpy's
    typecode, dtype name and byte order and the pixels; cPickle's memo from 1; the official key order."""
    split = data.make_synthetic(2, seed=3)
    data.write_batch(tmp_path / "b", split, label="training batch 1 of 5")
    blob = (tmp_path / "b").read_bytes()
    ops = _ops(blob)
    names = {name for name, _ in ops}
    assert not {n for n in names if "UNICODE" in n or "BYTES" in n or n in ("FRAME", "MEMOIZE", "STACK_GLOBAL")}
    assert [arg for name, arg in ops if name == "GLOBAL"] == [
        "numpy.core.multiarray _reconstruct",
        "numpy ndarray",
        "numpy dtype",
    ]
    assert [arg for name, arg in ops if name in ("BINPUT", "LONG_BINPUT")] == list(range(1, 16))
    pixels = np.ascontiguousarray(split.images.transpose(0, 3, 1, 2)).tobytes().decode("latin1")
    labels = [int(x) for x in split.labels]
    assert _without_memo(ops) == [
        ("PROTO", 2),
        ("EMPTY_DICT", None),
        ("MARK", None),
        ("SHORT_BINSTRING", "batch_label"),
        ("SHORT_BINSTRING", "training batch 1 of 5"),
        ("SHORT_BINSTRING", "labels"),
        ("EMPTY_LIST", None),
        ("MARK", None),
        ("BININT1", labels[0]),
        ("BININT1", labels[1]),
        ("APPENDS", None),
        ("SHORT_BINSTRING", "data"),
        ("GLOBAL", "numpy.core.multiarray _reconstruct"),
        ("GLOBAL", "numpy ndarray"),
        ("BININT1", 0),
        ("TUPLE1", None),
        ("SHORT_BINSTRING", "b"),  # the typecode
        ("TUPLE3", None),
        ("REDUCE", None),
        ("MARK", None),
        ("BININT1", 1),
        ("BININT1", 2),
        ("BININT2", 3072),
        ("TUPLE2", None),
        ("GLOBAL", "numpy dtype"),
        ("SHORT_BINSTRING", "u1"),  # the dtype name
        ("BININT1", 0),
        ("BININT1", 1),
        ("TUPLE3", None),
        ("REDUCE", None),
        ("MARK", None),
        ("BININT1", 3),
        ("SHORT_BINSTRING", "|"),  # the byte order
        ("NONE", None),
        ("NONE", None),
        ("NONE", None),
        ("BININT", -1),
        ("BININT", -1),
        ("BININT1", 0),
        ("TUPLE", None),
        ("BUILD", None),
        ("NEWFALSE", None),
        ("BINSTRING", pixels),  # 6,144 raw bytes: over 255, so BINSTRING
        ("TUPLE", None),
        ("BUILD", None),
        ("SHORT_BINSTRING", "filenames"),
        ("EMPTY_LIST", None),
        ("MARK", None),
        ("SHORT_BINSTRING", "00000.png"),
        ("SHORT_BINSTRING", "00001.png"),
        ("APPENDS", None),
        ("SETITEMS", None),
        ("STOP", None),
    ]
    # and Python 3 reads it as the official files read: bytes everywhere
    raw = pickle.loads(blob, encoding="bytes")
    assert list(raw) == [b"batch_label", b"labels", b"data", b"filenames"]
    assert raw[b"batch_label"] == b"training batch 1 of 5" and raw[b"filenames"] == [b"00000.png", b"00001.png"]


def test_meta_and_large_batches_use_the_official_forms(tmp_path):
    data.write_meta(tmp_path / "meta", data.SYNTHETIC_CLASSES)
    assert pickle.loads((tmp_path / "meta").read_bytes(), encoding="bytes") == {
        b"num_cases_per_batch": 10000,
        b"label_names": [n.encode() for n in data.SYNTHETIC_CLASSES],
        b"num_vis": 3072,
    }
    # 1,200 labels: cPickle appends in batches of 1,000; memo ids past 255 take LONG_BINPUT
    split = data.make_synthetic(1200, seed=1)
    data.write_batch(tmp_path / "big", split)
    ops = _ops((tmp_path / "big").read_bytes())
    assert [name for name, _ in ops].count("APPENDS") == 4  # labels 1000 + 200, file names 1000 + 200
    assert ("LONG_BINPUT", 256) in ops and ("BININT2", 1200) in ops
    assert not any("UNICODE" in name for name, _ in ops)


def test_the_python3_variant_is_what_pickle_dump_writes(tmp_path):
    split = data.make_synthetic(3, seed=2)
    data.write_batch(tmp_path / "b", split, encoding="python3", label="x")
    ops = _ops((tmp_path / "b").read_bytes())
    assert ops[0] == ("PROTO", pickle.DEFAULT_PROTOCOL) and ("SHORT_BINUNICODE", "labels") in ops
    with pytest.raises(ValueError, match=r"encoding='latin' is not allowed: expected one of python2, python3"):
        data.write_batch(tmp_path / "c", split, encoding="latin")


# ------------------------------------------------------------------------------------------------ the reader


def _producers(split: data.Split) -> dict[str, bytes]:
    """The same batch as each producer writes it."""
    pixels = np.ascontiguousarray(split.images.transpose(0, 3, 1, 2)).reshape(len(split), 3072)
    labels = [int(x) for x in split.labels]
    out = {"python2-cpickle": py2_pickle.dumps({"batch_label": "b", "labels": labels, "data": pixels})}
    for protocol in (2, 3, 4, 5):
        for keys in ("str", "bytes"):
            key = (lambda k: k) if keys == "str" else (lambda k: k.encode())
            batch = {key("batch_label"): b"b", key("labels"): labels, key("data"): pixels}
            out[f"python3-protocol{protocol}-{keys}-keys"] = pickle.dumps(batch, protocol=protocol)
    # labels as a numpy int64 array (np.save users, torchvision's own re-pickles), Fortran-ordered pixels
    out["python3-array-labels-fortran-data"] = pickle.dumps(
        {"labels": np.asarray(labels, "<i8"), "data": np.asfortranarray(pixels)}, protocol=2
    )
    return out


@pytest.mark.parametrize("producer", list(_producers(data.make_synthetic(1, seed=0))))
def test_the_reader_equals_pickle_load_bytes_bit_for_bit(tmp_path, producer):
    split = data.make_synthetic(5, seed=4)
    path = tmp_path / "data_batch_1"
    path.write_bytes(_producers(split)[producer])
    reference = pickle.loads(path.read_bytes(), encoding="bytes")
    reference = {k.decode() if isinstance(k, bytes) else k: v for k, v in reference.items()}
    ours = load_pickle(path)
    assert set(ours) == set(reference)
    for key, want in reference.items():
        if isinstance(want, np.ndarray):
            assert ours[key].dtype == want.dtype and ours[key].shape == want.shape
            assert ours[key].tobytes() == want.tobytes(), key
        else:
            assert ours[key] == want, key
    got = data.read_batch(path)
    np.testing.assert_array_equal(got.images, split.images)
    np.testing.assert_array_equal(got.labels, split.labels)


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Python's own pickler, writing every str and bytes as Python 2 did (SHORT_BINSTRING / BINSTRING): the
    hostile cases of round two in the official files' encoding."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_string(self, obj):
        raw = obj.encode() if isinstance(obj, str) else obj
        head = b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw))
        self.write(head + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


class _Reduce:
    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _py2(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _hostile_py2_cases():
    from numpy._core.multiarray import _reconstruct

    plain = (3, "|", None, None, None, -1, -1, 0)
    u1 = _Reduce(np.dtype, ("u1", 0, 1), plain)
    return {
        "payload": ({"data": _Reduce(os.system, ("touch PWNED",))}, "refusing to load posix.system"),
        "structured-dtype": (
            {"data": _Reduce(np.dtype, ("V8", 0, 1), plain)},
            "refusing dtype 'V8': only plain numeric arrays are read",
        ),
        "object-dtype": ({"data": _Reduce(np.dtype, ("O", 0, 1), plain)}, "refusing dtype 'O': only plain"),
        "crafted-dtype-state": (
            {"data": _Reduce(np.dtype, ("u1", 0, 1), (4, "|", ("a", "b"), {"a": (1, -5)}, -(2**63), 1))},
            "refusing a u1 dtype whose pickled state is not numpy's plain one",
        ),
        "byte-order-of-a-wider-type": (
            {"data": _Reduce(np.dtype, ("u1", 0, 1), (3, "<", None, None, None, -1, -1, 0))},
            "refusing a u1 dtype whose pickled state is not numpy's plain one",
        ),
        "short-buffer": (
            {"data": _Reduce(_reconstruct, (np.ndarray, (0,), "b"), (1, (2**40, 3072), u1, False, "\0" * 8))},
            f"an array of shape {(2**40, 3072)} needs {2**40 * 3072} bytes, the file holds 8",
        ),
        "other-typecode": (
            {"data": _Reduce(_reconstruct, (np.ndarray, (0,), "x"), (1, (1,), u1, False, "\0"))},
            "refusing an array constructor that is not numpy's plain one",
        ),
        "codecs-other-than-latin1": (
            {"data": _Reduce(__import__("codecs").encode, ("a", "rot13"))},
            "refusing _codecs.encode(..., b'rot13')",
        ),
    }


@pytest.mark.parametrize("case", list(_hostile_py2_cases()))
def test_what_round_two_refused_is_refused_in_python2_encoding_too(tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    obj, reason = _hostile_py2_cases()[case]
    path = tmp_path / "data_batch_1"
    blob = _py2(obj)
    assert not any("UNICODE" in name for name, _ in _ops(blob))
    path.write_bytes(blob)
    with pytest.raises(data.DataError) as err:
        data.read_batch(path)
    assert str(err.value).startswith(f"{path}: not a readable CIFAR-10 pickle (") and reason in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_protocol5_buffers_are_checked_like_any_array(tmp_path):
    """numpy's protocol-5 reduction (_frombuffer) gets the same checks; a BUILD aimed at its result is refused."""
    from numpy._core.numeric import _frombuffer

    u1 = _Reduce(np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 0))
    cases = {
        "short": (_Reduce(_frombuffer, (bytearray(8), u1, (4, 3072), "C")), "needs 12288 bytes, the file holds 8"),
        "order": (_Reduce(_frombuffer, (bytearray(4), u1, (4,), "K")), "refusing an array of order 'K'"),
        "rebuilt": (
            _Reduce(_frombuffer, (bytearray(4), u1, (4,), "C"), (1, (4,), u1, False, b"\0" * 4)),
            "refusing an array whose pickled state is not numpy's plain one",
        ),
    }
    for name, (array, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"data": array}, protocol=5))
        with pytest.raises(data.DataError, match=reason):
            data.read_batch(path)


# ---------------------------------------------------------------------------------------- the download path


def test_mlflow_run_downloads_checks_extracts_and_trains_on_an_official_layout_archive(trained_template):
    """The shared store's training run (conftest.trained, read where it was built): `mlflow run -P
    dataset=cifar10` into an empty data_dir, CIFAR_MLFLOW_CIFAR10_URL naming an archive laid out as the official
    one (and its MD5) on a loopback HTTP server. It was downloaded, checked, extracted, and trained on."""
    root, facts = trained_template
    data_dir = Path(facts["data_dir"])
    assert sorted(p.name for p in data_dir.iterdir()) == [data.LAYOUT], "the download left nothing else behind"
    assert "readme.html" in {p.name for p in (data_dir / data.LAYOUT).iterdir()}
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(facts["train_run_id"])
    assert run.info.status == "FINISHED"
    assert (run.data.params["dataset"], run.data.params["data/train_size"], run.data.params["data/test_size"]) == (
        "cifar10",
        str(TRAINED["max_train_samples"]),
        str(TRAINED["max_test_samples"]),
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy")] == [1, 2, 3]
    assert run.data.tags["registered_model_version"] == "1"
    # trained on exactly what the archive holds (the first max_train_samples / max_test_samples images)
    digests = {i.tags[0].value: i.dataset.digest for i in run.inputs.dataset_inputs}
    served = data.load_dataset("cifar10", root / "archive", TRAINED["max_train_samples"], TRAINED["max_test_samples"])
    assert digests == {"training": data.array_digest(served.train), "evaluation": data.array_digest(served.test)}


def test_the_archive_without_its_own_md5_is_held_to_the_official_one(http_dir, tmp_path, monkeypatch):
    www, base = http_dir
    official_archive(tmp_path / "src", www / data.ARCHIVE, train_per_batch=4, test_images=4)
    monkeypatch.setenv(data.URL_ENV, f"{base}/{data.ARCHIVE}")
    with pytest.raises(
        data.DataError, match=rf"downloaded archive has MD5 [0-9a-f]{{32}}, expected {data.CIFAR10_MD5}"
    ):
        data.download_cifar10(tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == []
    monkeypatch.setenv(data.URL_ENV, f"{base}/{data.ARCHIVE}#md5={'0' * 32}")
    with pytest.raises(data.DataError, match=rf"expected {'0' * 32}; not extracting it"):
        data.download_cifar10(tmp_path / "dl")
    monkeypatch.setenv(data.URL_ENV, f"{base}/{data.ARCHIVE}#sha1=abc")
    with pytest.raises(data.DataError, match=r"the only fragment a CIFAR-10 URL may carry is #md5=<32 hex digits>"):
        data.download_cifar10(tmp_path / "dl")


def _closed_port_url() -> str:
    with socket.socket() as s:  # a port nothing listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/{data.ARCHIVE}"


def test_an_archive_brought_into_data_dir_is_checked_and_extracted_offline(tmp_path, monkeypatch):
    md5 = official_archive(tmp_path / "src", tmp_path / data.ARCHIVE, train_per_batch=4, test_images=4)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(tmp_path / data.ARCHIVE, data_dir / data.ARCHIVE)
    monkeypatch.setenv(data.URL_ENV, _closed_port_url())  # nothing is downloaded
    # not the official archive: refused, nothing extracted
    with pytest.raises(data.DataError) as err:
        data.load_dataset("cifar10", data_dir)
    assert str(err.value) == (
        f"{data_dir / data.ARCHIVE} has MD5 {md5}, expected {data.CIFAR10_MD5}; not extracting it: replace it with "
        f"the archive from {data.CIFAR10_URL}, or remove it to download"
    )
    assert sorted(p.name for p in data_dir.iterdir()) == [data.ARCHIVE]
    # the same archive with its checksum named (as a mirror would): extracted and read
    monkeypatch.setenv(data.URL_ENV, f"{_closed_port_url()}#md5={md5}")
    ds = data.load_dataset("cifar10", data_dir)
    assert (len(ds.train), len(ds.test)) == (20, 4)
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([data.ARCHIVE, data.LAYOUT])


def test_offline_error_names_the_builtin_real_images_and_how_to_bring_the_archive(tmp_path, monkeypatch):
    monkeypatch.setenv(data.URL_ENV, _closed_port_url())
    with pytest.raises(data.DataError) as err:
        data.load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"could not download CIFAR-10 from {_closed_port_url().rsplit(':', 1)[0]}")
    assert msg.endswith(
        f"offline? dataset=digits trains on real images that need no download (built in), or bring CIFAR-10: copy "
        f"{data.ARCHIVE} into {tmp_path} (its MD5 is checked, then it is extracted) or its extracted "
        f"'{data.LAYOUT}' folder to {tmp_path / data.LAYOUT}"
    )
    assert "synthetic" not in msg and "\n" not in msg and list(tmp_path.iterdir()) == []
