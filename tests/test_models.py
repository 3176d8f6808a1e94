"""ResNet for 32x32 on torchvision's ResNet: size, names, in-model normalisation, safe save/load."""

import json
import os

import pytest
import torch
from torchvision.models.resnet import ResNet

from cifar_mlflow import models
from cifar_mlflow.errors import ModelError

CLASSES = tuple(f"c{i}" for i in range(10))
SPEC = models.ModelSpec("resnet18", CLASSES, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.build_model(SPEC).eval()


def test_resnet18_has_exactly_the_cifar_parameter_count(net):
    assert models.num_parameters(net) == 11_173_962


def _pixels_on_a_path_to_the_logits(model) -> int:
    """Input pixels whose value changes the logits, BatchNorm as the fixed affine map of eval mode."""
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model.eval()(x).sum().backward()
    return int((x.grad.abs().sum((0, 1)) > 0).sum())


def test_every_input_pixel_reaches_the_logits_at_initialisation():
    """With zero-initialised residual branches (v0), only the 1x1 stride-2 projection shortcuts carry signal:
    a stride-8 grid of 3x3 patches, 121 of 1,024 pixels, which crops and holes shuffle. Now every pixel."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    model = models.build_model(SPEC)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert all(torch.equal(b.bn2.weight, torch.ones_like(b.bn2.weight)) for b in blocks)
    assert _pixels_on_a_path_to_the_logits(model) == 32 * 32
    for b in blocks:
        nn.init.zeros_(b.bn2.weight)
    assert _pixels_on_a_path_to_the_logits(model) == 121


def test_convolutions_have_pytorchs_default_scale_not_hes():
    """Each conv feeds a BatchNorm, so |w|^2 sets its effective step lr/|w|^2: PyTorch's default init (variance
    1/(3 fan_in)), as the notebooks have it. torchvision's He fan_out normal (2/fan_out) is ~6x larger for every
    conv but the 3-channel stem."""
    import statistics

    from torch import nn

    torch.manual_seed(0)
    convs = [m for m in models.build_model(SPEC).modules() if isinstance(m, nn.Conv2d)]
    ratios = []
    for conv in convs:
        fan_in = conv.weight[0].numel()
        assert conv.weight.var().item() == pytest.approx(1 / (3 * fan_in), rel=0.25)
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        ratios.append((2 / fan_out) / (1 / (3 * fan_in)))
    assert statistics.median(ratios) == pytest.approx(6.0, rel=0.02)


def test_resnet34_parameter_count():
    assert (
        models.num_parameters(models.build_model(models.ModelSpec("resnet34", CLASSES, (0,) * 3, (1,) * 3)))
        == 21_282_122
    )


@pytest.mark.parametrize("arch, width, count", [("resnet18", 16, 701_466), ("resnet34", 32, 5_326_506)])
def test_width_scales_every_stage_and_keeps_the_names(arch, width, count):
    """width: layer1..layer4 at width, 2x, 4x, 8x channels, the same modules and names as the published network
    (GradCAM's targets, the analysis' layer names), parameters ~ width squared."""
    narrow = models.build_model(models.ModelSpec(arch, CLASSES, (0,) * 3, (1,) * 3, width=width))
    assert models.num_parameters(narrow) == count
    assert narrow.conv1.out_channels == width and narrow.fc.in_features == 8 * width
    assert [getattr(narrow, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)] == [width << i for i in range(4)]
    wide = models.build_model(models.ModelSpec(arch, CLASSES, (0,) * 3, (1,) * 3))
    assert [n for n, _ in narrow.named_modules()] == [n for n, _ in wide.named_modules()]
    assert narrow(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_width_is_saved_read_back_and_checked(tmp_path):
    """model_config.json carries the width (a config written before it existed means 64); a width GroupNorm's 32
    groups cannot divide, or out of range, is refused in one line."""
    spec = models.ModelSpec("resnet18", CLASSES, (0.5,) * 3, (0.25,) * 3, width=16)
    models.save_model_files(models.build_model(spec), spec, tmp_path)
    assert models.read_spec(tmp_path) == spec
    raw = json.loads((tmp_path / models.CONFIG_FILE).read_text())
    (tmp_path / models.CONFIG_FILE).write_text(json.dumps({k: v for k, v in raw.items() if k != "width"}))
    assert models.read_spec(tmp_path).width == 64
    for width, norm, message in [
        (16, "group", "width=16 is not allowed with norm='group': GroupNorm's 32 groups need a multiple of 32"),
        (4, "batch", "width=4 is not allowed: expected an integer from 8 to 512"),
        ("16", "batch", "width='16' is not allowed: expected an integer from 8 to 512"),
    ]:
        (tmp_path / models.CONFIG_FILE).write_text(json.dumps({**raw, "width": width, "norm": norm}))
        with pytest.raises(ModelError) as info:
            models.read_spec(tmp_path)
        assert str(info.value) == f"{tmp_path / models.CONFIG_FILE}: {message}"


def test_cifar_stem_and_torchvision_names(net):
    assert isinstance(net, ResNet)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert all(hasattr(net, f"layer{i}") for i in range(1, 5))
    assert net.fc.out_features == 10


def test_output_shape_and_in_model_normalisation(net):
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        by_hand = ResNet.forward(net, (x - net.mean) / net.std)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out, by_hand)
    torch.testing.assert_close(net.mean.flatten(), torch.tensor(SPEC.mean))


def test_save_and_load_round_trip(net, tmp_path):
    models.save_model_files(net.to(memory_format=torch.channels_last), SPEC, tmp_path)
    loaded, spec = models.load_model_files(tmp_path)
    assert spec == SPEC and not loaded.training
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(models.predict_proba(loaded, x), models.predict_proba(net, x))
    probs = models.predict_proba(loaded, x)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_flip_tta_loop_gives_the_plain_and_the_mirrored_logits(net):
    """inference.logits with flip: the images' logits exactly as without flip, and their mirrors' logits."""
    from cifar_mlflow.training import inference

    x, cpu = torch.rand(3, 3, 32, 32), torch.device("cpu")
    ((plain, _),) = inference.logits(net, [(x, None)], cpu, "fp32")
    ((both, _),) = inference.logits(net, [(x, None)], cpu, "fp32", flip=True)
    ((mirrored, _),) = inference.logits(net, [(torch.flip(x, dims=[3]), None)], cpu, "fp32")
    assert both.shape == (2, 3, 10) and torch.equal(both[0], plain)
    torch.testing.assert_close(both[1], mirrored)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_planted_as_weights_is_refused_not_executed(net, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models.save_model_files(net, SPEC, tmp_path)
    torch.save({"conv1.weight": _Payload()}, tmp_path / models.WEIGHTS_FILE)  # a pickle, not safetensors
    with pytest.raises(ModelError, match="weights.safetensors: not loadable weights"):
        models.load_model_files(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_weights_of_another_architecture_are_refused(net, tmp_path):
    models.save_model_files(net, SPEC, tmp_path)
    cfg = json.loads((tmp_path / models.CONFIG_FILE).read_text())
    (tmp_path / models.CONFIG_FILE).write_text(json.dumps({**cfg, "arch": "resnet34"}))
    with pytest.raises(ModelError, match="not loadable weights for resnet34"):
        models.load_model_files(tmp_path)


def test_broken_config_is_refused(tmp_path):
    (tmp_path / models.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="model_config.json: not a valid model config"):
        models.load_model_files(tmp_path)
