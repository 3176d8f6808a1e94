"""Hostile and broken input, as tables of cases. Every parameter of every entry point with wrong-type,
out-of-range and unknown values; truncated, mis-shaped and booby-trapped data files; a wrong-MD5 and an escaping
archive; a model URI that does not exist. Each case: non-zero exit, a one-line message naming the problem, no
MLflow run created or left RUNNING, nothing written outside the intended folders."""

import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
from mlflow import MlflowClient

from cifar_mlflow import data
from cifar_mlflow.cli import invoke
from cifar_mlflow.config import AnalyzeConfig, LRFindConfig, PipelineConfig, TrainConfig
from cifar_mlflow.fields import field_type
from entrypoints.analyze import analyze
from entrypoints.lr_find import lr_find
from entrypoints.pipeline import pipeline
from entrypoints.train import train

COMMANDS = {
    "main": (train, TrainConfig),
    "analyze": (analyze, AnalyzeConfig),
    "lr_find": (lr_find, LRFindConfig),
    "pipeline": (pipeline, PipelineConfig),
}


def _bad_values(f: dataclasses.Field):
    """(what, value, expected message fragment) for one parameter, from its declared type and range."""
    m, kind = f.metadata, field_type(f)
    if kind is bool:
        yield "unknown", "yes", "'yes' is not one of 'true', 'false'"
        return
    if m["choices"]:
        yield "unknown", "bogus", f"'bogus' is not one of {', '.join(repr(c) for c in m['choices'])}"
        return
    if kind is str:
        yield "empty", "", f"{f.name}='' is not allowed"
        if m["pattern"]:
            yield "malformed", "no such thing!", f"{f.name}='no such thing!' is not allowed: expected {m['pattern'][1]}"
        return
    word = "integer" if kind is int else "float"
    yield "wrong type", "abc", f"'abc' is not a valid {word}"
    if m["low"] is not None:
        value = m["low"] if m["low_open"] else m["low"] - 1
        yield "too low", str(int(value) if kind is int else float(value)), "is not in the range"
    if m["high"] is not None:
        value = m["high"] if m["high_open"] else m["high"] + 1
        yield "too high", str(int(value) if kind is int else float(value)), "is not in the range"


PARAM_CASES = [
    pytest.param(entry, f.name, value, expected, id=f"{entry}-{f.name}-{what}")
    for entry, (_, config) in COMMANDS.items()
    for f in dataclasses.fields(config)
    for what, value, expected in _bad_values(f)
]


@pytest.fixture(scope="module")
def store(module_store):
    """One store for the module: every case checks that it stays without runs."""
    return module_store


@pytest.fixture
def sandbox(store, tmp_path, monkeypatch):
    """An empty working directory; after the case, it must still be empty and the store must hold no run."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    yield work
    assert list(work.iterdir()) == [], "something was written to the working directory"
    client = MlflowClient(store.uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def _one_line_error(entry, args, *fragments):
    code, message = invoke(COMMANDS[entry][0], args)
    assert code != 0, f"{entry} {args} was accepted"
    assert "\n" not in message.strip(), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_every_parameter_has_cases():
    covered = {(c.values[0], c.values[1]) for c in PARAM_CASES}
    assert covered == {(e, f.name) for e, (_, cfg) in COMMANDS.items() for f in dataclasses.fields(cfg)}


@pytest.mark.parametrize("entry, name, value, expected", PARAM_CASES)
def test_bad_parameter_values(sandbox, entry, name, value, expected):
    message = _one_line_error(entry, [f"--{name}", value], expected)
    assert f"--{name}" in message or f"{name}=" in message


@pytest.mark.parametrize("entry", ["main", "lr_find", "pipeline"])
def test_a_width_groupnorm_cannot_divide(sandbox, entry):
    _one_line_error(
        entry,
        ["--width", "48", "--norm", "group"],
        "width=48 is not allowed with norm='group': GroupNorm's 32 groups need a multiple of 32",
    )


@pytest.mark.parametrize("entry", list(COMMANDS))
def test_unknown_parameter(sandbox, entry):
    _one_line_error(entry, ["--learning_rate", "0.1"], "No such option '--learning_rate'")


# ---------------------------------------------------------------------------------------------- data


def _batch(images=None, labels=None):
    """A batch dict as the real files hold it (bytes keys), with one field replaced."""
    return {
        b"data": np.zeros((4, 3072), np.uint8) if images is None else images,
        b"labels": [0] * 4 if labels is None else labels,
    }


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _write(name, obj):
    def corrupt(folder):
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
        return folder / name

    return corrupt


def _truncate(name):
    def corrupt(folder):
        (folder / name).write_bytes((folder / name).read_bytes()[:700])
        return folder / name

    return corrupt


def _remove(name):
    def corrupt(folder):
        (folder / name).unlink()
        return folder / name

    return corrupt


DATA_CASES = [
    ("truncated pickle", _truncate("data_batch_2"), "{path}: not a readable CIFAR-10 pickle"),
    (
        "wrong shape",
        _write("data_batch_1", _batch(images=np.zeros((4, 3000), np.uint8))),
        "{path}: 'data' must be a (N, 3072) uint8 array, got shape (4, 3000) dtype uint8",
    ),
    (
        "wrong dtype",
        _write("data_batch_3", _batch(images=np.zeros((4, 3072), np.int16))),
        "{path}: 'data' must be a (N, 3072) uint8 array, got shape (4, 3072) dtype int16",
    ),
    ("labels outside 0-9", _write("test_batch", _batch(labels=[0, 12, 3, 1])), "{path}: label 12 is outside 0-9"),
    (
        "labels not numbers",
        _write("test_batch", _batch(labels=[b"cat"] * 4)),
        "{path}: 'labels' must be a list of integers 0-9",
    ),
    ("missing file", _remove("data_batch_5"), "{path}: file is missing"),
    ("missing class names", _remove("batches.meta"), "{path}: file is missing"),
    (
        "pickle payload",
        _write("data_batch_1", {b"data": _Payload(), b"labels": []}),
        "{path}: not a readable CIFAR-10 pickle (refusing to load posix.system)",
    ),
]


@pytest.mark.parametrize("corrupt, expected", [pytest.param(c, e, id=n) for n, c, e in DATA_CASES])
def test_broken_data_files(sandbox, cifar_root, tmp_path, corrupt, expected):
    root = tmp_path / "data"
    shutil.copytree(cifar_root, root)
    path = corrupt(root / data.LAYOUT)
    before = sorted(p.name for p in (root / data.LAYOUT).iterdir())
    _one_line_error("main", ["--data_dir", str(root), "--epochs", "1"], expected.format(path=path))
    assert sorted(p.name for p in (root / data.LAYOUT).iterdir()) == before
    assert not (sandbox / "PWNED").exists()


def test_archive_with_the_wrong_md5(sandbox, tmp_path, cifar_root, http_dir, monkeypatch):
    www, base = http_dir
    with tarfile.open(www / "cifar.tar.gz", "w:gz") as tar:
        tar.add(cifar_root / data.LAYOUT, arcname=data.LAYOUT)
    monkeypatch.setenv(data.URL_ENV, f"{base}/cifar.tar.gz")
    target = tmp_path / "fresh"
    _one_line_error(
        "main",
        ["--data_dir", str(target), "--epochs", "1"],
        f"{base}/cifar.tar.gz: downloaded archive has MD5",
        f"expected {data.CIFAR10_MD5}; not extracting it",
    )
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("member", ["../escape.txt", "/tmp/cifar-mlflow-escape.txt", "a/../../escape.txt"])
def test_archive_escaping_the_target(tmp_path, http_dir, member):
    www, base = http_dir
    with tarfile.open(www / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    md5 = hashlib.md5((www / "evil.tar.gz").read_bytes()).hexdigest()
    target = tmp_path / "deep" / "target"
    with pytest.raises(data.DataError) as err:
        data.download_cifar10(target, url=f"{base}/evil.tar.gz", md5=md5)
    assert f"refusing to extract unsafe member {member!r}" in str(err.value) and "\n" not in str(err.value)
    assert list(target.iterdir()) == []
    assert not list(tmp_path.rglob("escape.txt")) and not os.path.exists("/tmp/cifar-mlflow-escape.txt")


def test_model_uri_that_does_not_exist(sandbox):
    _one_line_error(
        "analyze",
        ["--model_uri", "models:/nope/1"],
        "model_uri 'models:/nope/1': no registered model 'nope'; registered models: none yet",
    )
