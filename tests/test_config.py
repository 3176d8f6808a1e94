"""TrainConfig: defaults, type coercion and one-line validation errors; booleans and what is logged for them."""

import dataclasses

import pytest
import torch

from cifar_mlflow.config import PipelineConfig, TrainConfig
from cifar_mlflow.errors import ConfigError


def test_defaults_are_valid_and_follow_the_recipe():
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.scheduler) == (20, 512, "scaled", "sgd", "onecycle")
    assert (cfg.weight_decay, cfg.label_smoothing, cfg.augment, cfg.arch) == (5e-4, 0.1, "standard", "resnet18")
    assert cfg.registered_model_name == "cifar10-resnet18" and cfg.data_dir == "data"


@pytest.mark.parametrize(
    "batch, lr", [(512, 0.2), (64, 0.025), (16, 0.00625), (8, 0.00625), (1, 0.00625), (8192, 3.2), (16384, 3.2)]
)
def test_lr_scaled_follows_the_batch_linearly_within_its_bounds(batch, lr):
    """Issue 26: lr 0.2 is a batch-512 value; at batch 64 it learned nothing in short runs."""
    from cifar_mlflow.config import scaled_lr
    from cifar_mlflow.training import optim

    assert scaled_lr(batch) == pytest.approx(lr)
    opt = optim.build_optimizer(TrainConfig(batch_size=batch), [torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults["lr"] == pytest.approx(lr)
    assert TrainConfig(batch_size=batch, lr=0.3).lr == 0.3  # a number is taken as given


def test_every_field_has_help_with_a_reason():
    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata["help"]) > 20, f.name


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().epochs = 3


def test_int_is_accepted_for_float_fields():
    cfg = TrainConfig(lr=1, weight_decay=0)
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0 and isinstance(cfg.weight_decay, float)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "foo"}, "optimizer='foo' is not allowed: expected one of sgd, adam, adamw"),
        ({"epochs": 0}, "epochs=0 is not allowed: expected an integer >= 1"),
        ({"batch_size": -3}, "batch_size=-3 is not allowed: expected an integer >= 1"),
        ({"lr": -0.1}, "lr=-0.1 is not allowed: expected a number > 0"),
        ({"lr": 0.0}, "lr=0.0 is not allowed: expected a number > 0"),
        ({"lr": float("nan")}, "lr=nan is not allowed"),
        ({"momentum": 1.0}, "momentum=1.0 is not allowed: expected a number >= 0 and < 1"),
        ({"label_smoothing": 1.5}, "label_smoothing=1.5 is not allowed"),
        (
            {"scheduler": "cosine!"},
            "scheduler='cosine!' is not allowed: expected one of onecycle, cosine, plateau, cyclic, none",
        ),
        ({"lr": "fast"}, "lr='fast' is not allowed: expected a number > 0, or auto"),
        ({"norm": "instance"}, "norm='instance' is not allowed: expected one of batch, group, layer"),
        (
            {"augment": "mixup"},
            "augment='mixup' is not allowed: expected one of standard, flip-cutout, heavy, rotate, none",
        ),
        ({"l1": -1e-5}, "l1=-1e-05 is not allowed: expected a number >= 0"),
        ({"dataset": "mnist"}, "dataset='mnist' is not allowed: expected one of cifar10, digits, synthetic"),
        ({"precision": "fp64"}, "precision='fp64' is not allowed: expected one of auto, fp32, bf16, fp16"),
        ({"epochs": "20"}, "epochs='20' is not allowed: expected an integer >= 1"),
        ({"epochs": True}, "epochs=True is not allowed"),
        ({"epochs": 2.5}, "epochs=2.5 is not allowed"),
        ({"num_workers": -2}, "num_workers=-2 is not allowed: expected an integer >= -1"),
        ({"compile": "true"}, "compile='true' is not allowed: expected true or false"),
        ({"compile": 1}, "compile=1 is not allowed: expected true or false"),
        (
            {"registered_model_name": " "},
            "registered_model_name=' ' is not allowed: expected letters, digits, '_', '-' "
            "and '.', starting with a letter or digit (at most 256 characters)",
        ),
    ],
)
def test_bad_values_get_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_to_params_lists_every_field():
    params = TrainConfig(epochs=3).to_params()
    assert set(params) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert params["epochs"] == 3


def test_booleans_are_bools_and_log_as_mlflow_run_logs_them():
    """`mlflow run -P compile=true` logs the param "true" before our code runs; logging "True" would clash."""
    assert TrainConfig().compile is False and TrainConfig(compile=True).compile is True
    assert TrainConfig(compile=True).to_params()["compile"] == "true"
    assert (
        PipelineConfig().to_params()["reuse"] == "true" and PipelineConfig(reuse=False).to_params()["reuse"] == "false"
    )


def test_pipeline_steps_keep_booleans():
    sweep, train, analyze = PipelineConfig(compile=True, epochs=3).steps()
    assert train.compile is True and train.epochs == 3 and train.to_params()["compile"] == "true"
