"""The tracking package against a real sqlite MLflow store: params that `mlflow run` already logged, the registry and the
champion alias, and loading models back both ways."""

import functools

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cifar_mlflow import models
from cifar_mlflow.errors import ConfigError, ModelError
from cifar_mlflow.tracking import registry, runs, serving
from tests.conftest import at_once

SPEC = models.ModelSpec("resnet18", tuple(f"class{i}" for i in range(10)), (0.5,) * 3, (0.25,) * 3, width=16)


def test_log_params_skips_values_already_logged_in_another_spelling(store):
    with runs.open_run() as log:
        run = log.run()
        mlflow.log_params({"lr": "2e-1", "epochs": "3", "weight_decay": "5e-4"})  # as `mlflow run -P` logs them
        log.log_params(
            {"lr": 0.2, "epochs": 3, "weight_decay": 0.0005, "data/mean": (0.5, 0.25, 0.125), "optimizer": "sgd"}
        )
        params = MlflowClient().get_run(run.info.run_id).data.params
        assert params["lr"] == "2e-1" and params["data/mean"] == "0.5,0.25,0.125" and params["optimizer"] == "sgd"
        log.log_params({"data/mean": (0.5, 0.25, 0.125), "lr": 0.2})  # a resume logs them again: fine
        with pytest.raises(
            ConfigError,
            match=r"other parameters: lr \(run: '2e-1', now: 0.3\); optimizer \(run: "
            r"'sgd', now: 'adam'\); resume it with the same parameters",
        ):
            log.log_params({"lr": 0.3, "epochs": 3, "optimizer": "adam"})


def test_failed_run_is_tagged_with_the_reason(store):
    with pytest.raises(RuntimeError):
        with runs.open_run() as log:
            raise RuntimeError("disk on fire")
    got = MlflowClient().get_run(log.run_id)
    assert got.info.status == "FAILED" and got.data.tags[runs.FAILURE_TAG] == "RuntimeError: disk on fire"


def test_fail_run_from_env_ends_a_run_created_by_mlflow_run(store, monkeypatch):
    run_id = MlflowClient().create_run(mlflow.get_experiment_by_name("tests").experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    runs.fail_run_from_env("epochs=0 is not allowed")
    got = MlflowClient().get_run(run_id)
    assert got.info.status == "FAILED" and got.data.tags[runs.FAILURE_TAG] == "epochs=0 is not allowed"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.build_model(SPEC).eval()


def _register(net, accuracy, name="reg-test"):
    example = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    with runs.open_run() as log:
        version = registry.log_and_register_model(log, net, SPEC, example, name, accuracy, epochs=2, test_size=300)
    return log.run_id, version


def test_registry_versions_tags_and_champion_alias(store, net):
    client = MlflowClient()
    run1, v1 = _register(net, 0.50)
    run2, v2 = _register(net, 0.40)
    run3, v3 = _register(net, 0.70)
    assert [v.version for v in (v1, v2, v3)] == ["1", "2", "3"]
    assert (v1.is_champion, v2.is_champion, v3.is_champion) == (True, False, True)
    assert str(client.get_model_version_by_alias("reg-test", "champion").version) == "3"
    mv2 = client.get_model_version("reg-test", "2")
    assert mv2.tags == {
        "test_accuracy": "0.400000",
        "epochs": "2",
        "run_id": run2,
        "test_size": "300",
        "above_chance": "true",
    }
    assert mv2.run_id == run2
    assert client.get_run(run2).data.tags["champion"] == "false"
    assert client.get_run(run3).data.tags["registered_model_version"] == "3"


def test_the_chance_bar_is_three_standard_errors_and_never_under_five_points():
    assert registry.chance_bar(10, 300) == pytest.approx(0.1 + 3 * (0.09 / 300) ** 0.5)  # 0.152 on digits
    assert registry.chance_bar(10, 10_000) == pytest.approx(0.15)  # CIFAR-10's test set: the 5-point floor
    assert registry.chance_bar(2, 100) == pytest.approx(0.65)


def test_two_runs_settling_the_champion_at_once_both_succeed_and_agree(store, tmp_path):
    """Two registrations at once may both find no alias and insert it together: the store refuses the second insert
    (sqlite: UNIQUE constraint failed; seen in the suite's two-runs-at-once server test). settle_champion reads
    again instead of failing the run, and both end on the best version. 20 models, two threads each: without the
    retry, several of them collide here."""
    client = MlflowClient(store.uri)
    for k in range(20):
        name = f"race-{k}"
        client.create_registered_model(name)
        for accuracy in ("0.5", "0.7"):
            client.create_model_version(name, tmp_path.as_uri(), tags={"test_accuracy": accuracy})
        # settle_champion(name) twice at once, each with its own client (as two runs have)
        settled = at_once([functools.partial(registry.settle_champion, MlflowClient(store.uri), name) for _ in "ab"])
        errors = [o for o in settled if isinstance(o, Exception)]
        assert not errors, f"{name}: {errors[0]!r}"[:600]
        assert settled == ["2", "2"] and str(client.get_model_version_by_alias(name, "champion").version) == "2"


def test_a_model_at_chance_is_registered_but_never_champion(store, net):
    """Issue 26: a sweep crowned a 0.097 model on digits. Registration still happens (versions compare), the
    alias is withheld and the run and version say why; the first model that learned takes it."""
    client = MlflowClient()
    run1, v1 = _register(net, 0.097, name="chance")
    reason = (
        "test accuracy 0.0970 is not clearly above chance (0.100 for 10 classes; it must exceed 0.152 on 300 test "
        "images): the model learned nothing"
    )
    assert (v1.version, v1.is_champion, v1.withheld) == ("1", False, reason)
    assert registry.current_champion(client, "chance") is None
    tags = client.get_run(run1).data.tags
    assert (tags["champion"], tags["champion_withheld"]) == ("false", reason)
    version = client.get_model_version("chance", "1")
    assert (version.tags["above_chance"], version.tags["champion_withheld"]) == ("false", reason)
    _run2, v2 = _register(net, 0.15, name="chance")  # below the bar too, though higher
    _run3, v3 = _register(net, 0.16, name="chance")
    assert [(v.is_champion, v.withheld is None) for v in (v2, v3)] == [(False, False), (True, True)]
    assert str(registry.current_champion(client, "chance").version) == "3"


def test_champion_rule_skips_versions_other_tools_tagged(store, net):
    """A version registered by hand or by another tool, tagged in the UI with what a person types: no part in the
    champion rule, and no crash after training."""
    client = MlflowClient()
    client.create_registered_model("foreign-tags")
    for value in ("n/a", "", "93%", "nan", "1.5"):
        client.create_model_version("foreign-tags", "file:///nowhere", tags={"test_accuracy": value})
    client.create_model_version("foreign-tags", "file:///nowhere")  # no tag at all
    _run, version = _register(net, 0.25, name="foreign-tags")
    assert (version.version, version.is_champion) == ("7", True)
    assert str(client.get_model_version_by_alias("foreign-tags", "champion").version) == "7"


def test_registered_model_loads_both_ways(store, net):
    """The pyfunc (a list of images in, probabilities out) and the real module; stock loading without the project
    is tests/test_stock_mlflow.py."""
    _register(net, 0.5, name="load-test")
    x = np.random.default_rng(1).random((5, 3, 32, 32), dtype=np.float32)
    expected = models.predict_proba(net, torch.from_numpy(x)).numpy()

    pyfunc = mlflow.pyfunc.load_model("models:/load-test@champion")
    probs = np.asarray(pyfunc.predict(list(x)))
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert pyfunc.metadata.metadata["class_names"] == list(SPEC.class_names)
    assert pyfunc.metadata.metadata["input"] == "float32 images (N, 3, 32, 32) with values in [0, 1] (pixel / 255)"

    module, spec = serving.load_torch_model("models:/load-test/1")
    assert isinstance(module, models.CifarResNet) and spec == SPEC
    np.testing.assert_allclose(models.predict_proba(module, torch.from_numpy(x)).numpy(), expected, atol=1e-5)


def test_pyfunc_rejects_wrong_input_shape(store, net):
    _register(net, 0.5, name="shape-test")
    pyfunc = mlflow.pyfunc.load_model("models:/shape-test/1")
    with pytest.raises(mlflow.MlflowException, match=r"input of shape \(2, 32, 32, 3\) is not allowed"):
        pyfunc.predict(list(np.zeros((2, 32, 32, 3), np.float32)))


def test_unknown_model_is_a_one_line_error(store):
    with pytest.raises(ModelError) as err:
        serving.load_torch_model("models:/no-such-model/1")
    assert "models:/no-such-model/1" in str(err.value) and "\n" not in str(err.value)
