"""Issue 23: a registered model is usable by any MLflow user. In a process where this project cannot be imported
(tests/without_project), stock `mlflow.pytorch.load_model` gives the network (logits) and `mlflow.pyfunc.load_model`
the class probabilities; the model holds one copy of the weights, in a torch.export archive that loads without
unpickling anything but tensor data; its graph is bound to no device; MLflow 3's logged model carries the run's
final metrics, with their datasets, and is found by `mlflow.search_logged_models`."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cifar_mlflow import data, models
from cifar_mlflow.errors import ModelError
from cifar_mlflow.tracking import registry, runs, serving

SPEC = models.ModelSpec("resnet18", tuple(f"class{i}" for i in range(10)), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), width=16)
X = np.random.default_rng(1).random((5, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = models.build_model(SPEC)
    with torch.no_grad():  # BatchNorm statistics other than the defaults, so that a lost buffer would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _register(net, name, accuracy=0.5, epochs=2):
    """A run with two epochs of metrics, the test ones measured on an evaluation split, then its model registered
    as training registers it."""
    split = data.Split(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4) % 10)
    dataset = data.Dataset("synthetic", split, split, SPEC.class_names, source="test")
    with runs.open_run() as log:
        log.measured_on("test/", dataset, split)
        for epoch in range(1, epochs + 1):
            log.log_metrics({"test/accuracy": accuracy * epoch / epochs, "train/loss": 1.0 / epoch}, step=epoch)
        version = registry.log_and_register_model(log, net, SPEC, X[:2], name, accuracy, epochs, test_size=300)
    return log.run_id, version


@pytest.fixture(scope="module")
def store(module_store):
    return module_store


@pytest.fixture(scope="module")
def registered(store, net) -> str:
    """models:/stock/1, registered once for the module's tests that only read it."""
    _register(net, "stock")
    return "models:/stock/1"


def _expected(net) -> np.ndarray:
    return models.predict_proba(net, torch.from_numpy(X)).numpy()


# A stock MLflow user's process (arguments 1 and 2: images saved with numpy, a model URI): the network and the pyfunc,
# loaded the stock way, and what they answer; then which of this project's packages got imported (none may be).
STOCK_USER = """
import json, sys
import mlflow, numpy as np, torch
for name in ("cifar_mlflow", "torchvision", "safetensors"):
    try:
        __import__(name)
        sys.exit(f"{name} is importable: this process is not what a stock MLflow user has")
    except ImportError:
        pass
x = np.load(sys.argv[1])
net = mlflow.pytorch.load_model(sys.argv[2])
with torch.no_grad():
    logits = net(torch.from_numpy(x))
pyfunc = mlflow.pyfunc.load_model(sys.argv[2])
print(json.dumps({
    "module": isinstance(net, torch.fx.GraphModule),
    "logits": logits.tolist(),
    "probabilities": pyfunc.predict(list(x)),
    "class_names": pyfunc.metadata.metadata["class_names"],
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("cifar_mlflow", "torchvision", "safetensors")),
}))
"""


def test_stock_mlflow_loads_the_network_and_the_pyfunc_where_the_project_is_not_installed(stock, net):
    got = stock["clean"]
    assert got["module"] is True and got["loaded"] == [] and got["class_names"] == list(SPEC.class_names)
    expected = _expected(net)
    # the pytorch flavor answers logits; their softmax is the pyfunc's answer, which is the trained network's
    np.testing.assert_allclose(torch.softmax(torch.tensor(got["logits"]), 1).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["probabilities"]), expected, atol=1e-5)


def test_loading_here_three_ways_gives_the_trained_networks_answers(store, net, registered):
    expected = _expected(net)
    exported = mlflow.pytorch.load_model(registered)
    with torch.no_grad():
        np.testing.assert_allclose(torch.softmax(exported(torch.from_numpy(X)), 1).numpy(), expected, atol=1e-5)
        # torch.export kept the batch dimension dynamic: one image and 7 images are answered too
        assert exported(torch.from_numpy(X[:1])).shape == (1, 10)
        assert exported(torch.from_numpy(np.concatenate([X, X[:2]]))).shape == (7, 10)

    pyfunc = mlflow.pyfunc.load_model(registered)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(list(X))), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(X.tolist())), expected, atol=1e-5)
    with pytest.raises(mlflow.MlflowException, match="Expected list, but got ndarray"):
        pyfunc.predict(X)  # MLflow's check of predict's type hint: a list of images, as docs/models.md says
    with pytest.raises(mlflow.MlflowException, match=r"input of shape \(2, 32, 32, 3\) is not allowed"):
        pyfunc.predict(list(np.zeros((2, 32, 32, 3), np.float32)))

    module, spec = serving.load_torch_model(registered)
    assert isinstance(module, models.CifarResNet) and spec == SPEC and not module.training
    for key, value in net.state_dict().items():  # every parameter and buffer, BatchNorm statistics included
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0, msg=key)
    np.testing.assert_allclose(models.predict_proba(module, torch.from_numpy(X)).numpy(), expected, atol=1e-6)


def _model_folder(uri: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))


def test_the_model_holds_one_copy_of_the_weights_and_ships_only_self_contained_code(registered, tmp_path):
    folder = _model_folder(registered, tmp_path / "dl")
    big = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 1 << 20)
    assert big == [f"{serving.PYTORCH_DATA}/{serving.EXPORTED_FILE}"], big
    assert (
        not list(folder.rglob("*.pth")) and not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.safetensors"))
    )
    flavors = mlflow.models.Model.load(str(folder)).flavors
    assert flavors["pytorch"]["model_data"] == serving.PYTORCH_DATA
    assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    code = [p.relative_to(folder) for p in folder.rglob("*.py")]
    assert code == [Path("served_model.py")], code
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse((folder / "served_model.py").read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imported == {"logging", "os", "typing", "mlflow", "numpy", "torch"}, imported
    reqs = (folder / "requirements.txt").read_text().split()
    assert sorted(r.split("==")[0] for r in reqs) == ["mlflow", "numpy", "torch"], reqs
    assert all("==" in r for r in reqs), reqs
    # what MLflow hands a user who asks for the model's dependencies (a stock process loads and predicts with
    # those three alone: test_stock_mlflow_loads_the_network_and_the_pyfunc_where_the_project_is_not_installed)
    assert open(mlflow.pyfunc.get_model_dependencies(registered)).read().split() == reqs
    spec = json.loads((folder / serving.PYTORCH_DATA / models.CONFIG_FILE).read_text())
    assert spec["class_names"] == list(SPEC.class_names) and spec["mean"] == list(SPEC.mean)


def test_the_exported_archive_unpickles_nothing_but_the_example_input(registered, net, tmp_path):
    """What docs/models.md and docs/security.md state about loading model.pt2: the graph is JSON, the weights raw
    bytes; the one pickled record is the example input, and torch's weights_only unpickler (tensors and containers only) accepts it."""
    archive = zipfile.ZipFile(_model_folder(registered, tmp_path / "dl") / serving.PYTORCH_DATA / "model.pt2")
    names = archive.namelist()
    config = json.loads(archive.read(next(n for n in names if n.endswith("model_weights_config.json"))))["config"]
    assert len(config) == len(net.state_dict()) and all(e["use_pickle"] is False for e in config.values())
    raw = {
        f"{n.rsplit('/', 1)[0]}/{e['path_name']}"
        for n in names
        if n.endswith("weights_config.json")
        for e in config.values()
    }
    pickled = []
    for name in names:
        content = archive.read(name)
        if name in raw:
            continue
        try:
            json.loads(content)
        except ValueError:
            if len(content) < 64 and b"\x80" not in content:
                continue  # the archive's version/format/byteorder lines
            pickled.append(name)
    assert [n.split("/", 1)[1] for n in pickled] == ["data/sample_inputs/model.pt"], pickled
    sample = torch.load(io.BytesIO(archive.read(pickled[0])), weights_only=True)
    assert torch.equal(sample[0][0], torch.from_numpy(X[:2]))


class _Planted:
    """Pickled, it calls Path.touch(marker) when unpickled: code run by loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tampered(registered: str, folder: Path, marker: Path) -> str:
    """The registered model with its model.pt2's example-input record replaced by a pickle that touches `marker`,
    logged back to the store as a model of a run of its own: that model's URI."""
    folder = _model_folder(registered, folder)
    pt2 = folder / serving.PYTORCH_DATA / "model.pt2"
    with zipfile.ZipFile(pt2) as src:
        entries = {n: src.read(n) for n in src.namelist()}
    buffer = io.BytesIO()
    torch.save({"x": _Planted(marker)}, buffer)
    entries[next(n for n in entries if n.endswith("sample_inputs/model.pt"))] = buffer.getvalue()
    with zipfile.ZipFile(pt2, "w") as dst:
        for name, content in entries.items():
            dst.writestr(name, content)
    with runs.open_run() as log:
        mlflow.log_artifacts(str(folder), "tampered")
    return f"runs:/{log.run_id}/tampered"


def _stock_python(store, cwd, script: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c script args` as a stock MLflow user runs it: this project not installed (tests/without_project)."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=store.env_without_project(),
        capture_output=True,
        text=True,
        timeout=300,
    )


# The same process then loads a tampered model (arguments 3 and 4: its URI, the marker file its pickle creates) twice:
# with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (MLflow reads it at each load), then with MLflow's default; after
# each, whether the planted code has run.
STOCK_LOADS = """\
import os, sys
import mlflow
uri, marker = sys.argv[3:5]
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
try:
    mlflow.pytorch.load_model(uri)
    print("false: loaded")
except Exception as exc:
    print("false: refused:", str(exc).splitlines()[0])
print("false: planted code ran:", os.path.exists(marker))
del os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
try:
    mlflow.pytorch.load_model(uri)  # runs the pickle, then fails on what it returned
except Exception:
    pass
print("default: planted code ran:", os.path.exists(marker))
"""


@pytest.fixture(scope="module")
def stock(store, net, registered, tmp_path_factory) -> dict:
    """One stock MLflow user's process for the module (tests/without_project: this project not installed), running
    STOCK_USER on models:/stock@champion, then STOCK_LOADS on a tampered copy of it: STOCK_USER's answer ("clean")
    and STOCK_LOADS' three lines ("tampered")."""
    tmp = tmp_path_factory.mktemp("stock")
    np.save(tmp / "x.npy", X)
    marker = tmp / "planted-code-ran"
    uri = _tampered(registered, tmp / "dl", marker)
    proc = _stock_python(
        store, tmp, STOCK_USER + STOCK_LOADS, str(tmp / "x.npy"), "models:/stock@champion", uri, str(marker)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    (clean,) = [json.loads(line) for line in lines if line.startswith("{")]
    return {"clean": clean, "tampered": lines[-3:]}


def test_a_pickle_planted_in_the_archive_never_runs_where_this_project_loads_it(stock, registered, tmp_path):
    """A tampered model.pt2 (its example-input record replaced by a pickle that runs code): load_torch_model and
    the pyfunc refuse it, whatever MLFLOW_ALLOW_PICKLE_DESERIALIZATION says; stock mlflow.pytorch.load_model
    refuses it with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, and runs it under MLflow 3.17's default (true):
    docs/security.md says so, and this test notices if MLflow changes that default."""
    marker = tmp_path / "planted-code-ran"
    uri = _tampered(registered, tmp_path / "dl", marker)
    for allowed in ("true", None):
        with pytest.MonkeyPatch.context() as mp:
            if allowed:
                mp.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", allowed)
            with pytest.raises(
                ModelError, match=r"model.pt2 not loaded \(Deserializing model using pickle is disallowed"
            ):
                serving.load_torch_model(uri)
            with pytest.raises(mlflow.MlflowException, match="is not a pickle-free payload"):
                mlflow.pyfunc.load_model(uri)
    assert not marker.exists(), "the planted code ran"

    refused, ran_refused, ran_default = stock["tampered"]  # the stock process, on a copy tampered the same way
    assert refused.startswith("false: refused:") and "is not a pickle-free payload" in refused, stock
    assert ran_refused == "false: planted code ran: False", "the planted code ran"
    assert ran_default == "default: planted code ran: True", (
        "MLflow's default now checks pt2 archives: update docs/security.md (Loading a model)"
    )


def test_the_exported_graph_is_bound_to_no_device(registered):
    """Exported on the CPU, the program must run on a CUDA host: its graph holds no device constant, so that
    moving its weights moves it. Shown without a GPU on PyTorch's meta device (shapes only, no data): a graph
    with a CPU-bound constant fails there."""
    exported = mlflow.pytorch.load_model(registered)
    for node in exported.graph.nodes:
        for value in [*node.args, *node.kwargs.values()]:
            assert not isinstance(value, torch.device), (node, value)
    on_meta = exported.to("meta")
    out = on_meta(torch.empty(3, 3, 32, 32, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 10)


def test_the_logged_model_carries_the_final_metrics_and_search_finds_the_champion(store, net):
    client = MlflowClient()
    runs_and_versions = [_register(net, "search", accuracy) for accuracy in (0.6, 0.9, 0.7)]
    champion = registry.current_champion(client, "search")
    assert str(champion.version) == "2"
    run2, v2 = runs_and_versions[1]
    assert v2.model_id and registry.logged_model_id(champion) == v2.model_id
    model = mlflow.get_logged_model(v2.model_id)
    assert model.source_run_id == run2 and model.status == "READY"
    metrics = {m.key: m for m in model.metrics}
    assert metrics["test/accuracy"].value == pytest.approx(0.9) and metrics["test/accuracy"].step == 2
    assert metrics["test/accuracy"].dataset_name == "synthetic" and metrics["test/accuracy"].dataset_digest
    assert metrics["train/loss"].dataset_name is None  # measured on no dataset this run named
    exp = client.get_run(run2).info.experiment_id
    best = mlflow.search_logged_models(
        experiment_ids=[exp],
        order_by=[{"field_name": "metrics.test/accuracy", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    assert [m.model_id for m in best] == [v2.model_id]
    # the run's history keeps one point per epoch: linking metrics to the model adds none to the run
    assert [m.step for m in client.get_metric_history(run2, "test/accuracy")] == [1, 2]


def test_models_registered_before_the_pytorch_flavor_still_load(store, net, tmp_path):
    """What main registered until now: a pyfunc whose loader is cifar_mlflow.tracking.serving, with
    model_config.json + weights.safetensors (tests/fixtures hold the older ones)."""
    files = tmp_path / "model_files"
    models.save_model_files(net, SPEC, files)
    with runs.open_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            loader_module="cifar_mlflow.tracking.serving",
            data_path=str(files),
            input_example=X[:2],
            # given, as main gave them (else MLflow infers them by loading the model in a process of its own)
            pip_requirements=["torch", "numpy", "safetensors"],
        )
    mv = mlflow.register_model(info.model_uri, "older")
    module, spec = serving.load_torch_model(f"models:/older/{mv.version}")
    assert spec == SPEC
    np.testing.assert_allclose(models.predict_proba(module, torch.from_numpy(X)).numpy(), _expected(net), atol=1e-6)
    probs = mlflow.pyfunc.load_model(f"models:/older/{mv.version}").predict(X)
    np.testing.assert_allclose(probs, _expected(net), atol=1e-5)


def test_importing_the_served_code_as_a_package_module_registers_no_model(tmp_path):
    """served_model.py runs as the model's code in MLflow (which calls set_model there) and is also a module of
    the package (the older models' loader uses its checks): imported, it must not set MLflow's model-from-code."""
    script = (
        "import mlflow.models.model as m\n"
        "import cifar_mlflow.tracking.served_model\n"
        "print(getattr(m, '__mlflow_model__', None))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stdout + proc.stderr[-2000:]
