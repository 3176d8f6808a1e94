"""Networks for 32x32 inputs, built on torchvision's ResNet, and their safe on-disk format.

The model takes float32 images in [0, 1], shape (N, 3, 32, 32), and normalises them itself (mean/std are
buffers saved with the weights), so every client (serving, analysis, notebooks) sends raw pixels.
On disk a model is two files: `model_config.json` (architecture, classes, normalisation) and
`weights.safetensors` (tensors only: loading it cannot execute code, unlike a pickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from cifar_mlflow.errors import ModelError, first_line
from cifar_mlflow.training import inference
from cifar_mlflow.values import GROUPNORM_GROUPS, NORMS, WIDTH, check_width

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1
_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
GROUPS = GROUPNORM_GROUPS  # GroupNorm's default group count (Wu & He 2018); values.check_width keeps widths divisible


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """batch: BatchNorm2d; group: GroupNorm(32); layer: GroupNorm(1), i.e. LayerNorm over (C, H, W)."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return partial(nn.GroupNorm, GROUPS)
    if norm == "layer":
        return partial(nn.GroupNorm, 1)
    raise ModelError(f"norm={norm!r} is not allowed: expected one of {', '.join(NORMS)}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights; saved as model_config.json."""

    arch: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    norm: str = "batch"
    format_version: int = FORMAT_VERSION
    width: int = WIDTH  # channels of layer1 (layer2-4: 2x, 4x, 8x); configs written before it existed mean 64

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class CifarResNet(ResNet):
    """torchvision ResNet with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool, so 32x32 inputs keep
    their resolution into layer1 (kuangliu/pytorch-cifar). `layer1..layer4` keep their torchvision names, so
    `model.layer4[-1]` is the obvious GradCAM target. `width` scales every stage's channels (layer1..layer4:
    width, 2x, 4x, 8x; 64 is the published network); the module names stay the same at any width."""

    def __init__(
        self,
        layers: list[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        norm: str = "batch",
        width: int = WIDTH,
    ) -> None:
        # No zero-init of the residual branches (torchvision's default; Goyal et al. 2017 use it to steady
        # 8k-image batches over 90 ImageNet epochs). Here the projection shortcuts are 1x1 stride-2 convs, so a
        # network whose branches start at zero sees only a stride-8 grid of 3x3 patches (121 of 1,024 pixels;
        # tests/test_models.py) until their BatchNorm scales grow, which a short schedule never gives them: on
        # real digits it learned to 0.31 in 6 epochs instead of 0.87 (benchmarks/RESULTS.md, recipe ablation).
        super().__init__(BasicBlock, layers, num_classes=num_classes, norm_layer=norm_layer(norm))
        if width != WIDTH:  # torchvision builds the published widths only: the stages again, narrower or wider
            self.inplanes = width
            self.bn1 = self._norm_layer(width)
            for i, blocks in enumerate(layers):
                setattr(self, f"layer{i + 1}", self._make_layer(BasicBlock, width << i, blocks, stride=min(i, 1) + 1))
            self.fc = nn.Linear(width << 3, num_classes)
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        # Convolutions keep PyTorch's default init (kaiming_uniform with a=sqrt(5): std 1/sqrt(3 fan_in)), as
        # kuangliu/pytorch-cifar and the course notebooks have it, not torchvision's He fan_out normal. Every
        # conv here feeds a BatchNorm, so its weight scale only sets its effective step, lr / |w|^2 (van Laarhoven
        # 2017; Hoffer et al. 2018): He's init makes |w|^2 6x larger (tests/test_models.py), i.e. every LR 6x
        # smaller in effect. With it the default lr=0.2 at batch 512 sat ~4x below the Lightning CIFAR-10
        # baseline's effective step, and a short run on real digits reached 0.10 test accuracy after 2 epochs
        # instead of 0.72 (benchmarks/RESULTS.md).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        self.maxpool = nn.Identity()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images in [0, 1], (N, 3, 32, 32). Returns logits (N, num_classes)."""
        return super().forward((x - self.mean) / self.std)


def build_model(spec: ModelSpec) -> CifarResNet:
    if spec.arch not in _LAYERS:
        raise ModelError(f"arch={spec.arch!r} is not allowed: expected one of {', '.join(_LAYERS)}")
    check_width(spec.width, spec.norm, ModelError)
    return CifarResNet(_LAYERS[spec.arch], spec.num_classes, spec.mean, spec.std, spec.norm, spec.width)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model_files(model: nn.Module, spec: ModelSpec, folder: Path) -> None:
    """Write model_config.json and weights.safetensors into folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    write_spec(spec, folder)
    # safetensors wants contiguous tensors; channels_last conv weights are not, so copy to the default layout.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "cifar-mlflow", "arch": spec.arch})


def write_spec(spec: ModelSpec, folder: Path) -> None:
    """model_config.json in folder (created if missing)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(asdict(spec), indent=2))


# A config lists a handful of class names (< 1 KB): anything bigger is not ours, and is refused before parsing.
MAX_CONFIG_BYTES = 64 * 1024
MAX_CLASSES = 1000  # ImageNet's count; the classifier's last layer is built before the weights load
MAX_CLASS_NAME = 200


def read_spec(folder: Path) -> ModelSpec:
    """model_config.json, every field checked (a tampered file is refused in one line, before anything is built)."""
    path = Path(folder) / CONFIG_FILE
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelError(
                f"{path}: {size:,} bytes is not a model config (at most {MAX_CONFIG_BYTES:,}); refused before parsing"
            )
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: not a valid model config ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: not a valid model config (a JSON object is expected)")
    spec = ModelSpec(
        arch=cast(str, raw.get("arch")),  # any JSON value until the check of arch below, before spec is returned
        class_names=_class_names(raw.get("class_names"), path),
        mean=_channels(raw.get("mean"), "mean", path, low=0.0),
        std=_channels(raw.get("std"), "std", path, low=0.0, low_open=True),
        norm=raw.get("norm", "batch"),
        format_version=raw.get("format_version", 0),
        width=raw.get("width", WIDTH),
    )
    if type(spec.format_version) is not int or spec.format_version != FORMAT_VERSION:
        raise ModelError(
            f"{path}: format_version {spec.format_version!r:.40} is not supported (expected {FORMAT_VERSION})"
        )
    for key, allowed in (("arch", tuple(_LAYERS)), ("norm", NORMS)):
        if getattr(spec, key) not in allowed:
            raise ModelError(f"{path}: {key} {getattr(spec, key)!r:.40} is not one of {', '.join(allowed)}")
    check_width(spec.width, spec.norm, ModelError, where=f"{path}: ")
    return spec


def _class_names(value: object, path: Path) -> tuple[str, ...]:
    if not (
        isinstance(value, list)
        and 2 <= len(value) <= MAX_CLASSES
        and all(isinstance(n, str) and 0 < len(n) <= MAX_CLASS_NAME for n in value)
    ):
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise ModelError(
            f"{path}: class_names must list 2 to {MAX_CLASSES} names (strings of 1-{MAX_CLASS_NAME} "
            f"characters), got {got}"
        )
    return tuple(value)


def _channels(value: object, name: str, path: Path, low: float, low_open: bool = False) -> tuple[float, ...]:
    """mean/std: three finite numbers in [0, 1] (fractions of 255), std above 0."""
    if not (
        isinstance(value, list)
        and len(value) == 3
        and all(
            type(v) in (int, float) and math.isfinite(v) and v <= 1 and (v > low if low_open else v >= low)
            for v in value
        )
    ):
        raise ModelError(
            f"{path}: {name} must be 3 numbers in {'(0' if low_open else '[0'}, 1], one per RGB "
            f"channel, got {json.dumps(value)[:60]}"
        )
    return tuple(float(v) for v in value)


def load_model_files(folder: Path, device: str | torch.device = "cpu") -> tuple[CifarResNet, ModelSpec]:
    """Rebuild the model from model_config.json and load weights.safetensors into it (strictly, in eval mode).
    Nothing is unpickled, and the file's tensor names and shapes are checked against the config's network before
    any tensor is read. The format of models registered before the `pytorch` flavor (tracking.serving)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    spec = read_spec(folder)
    path = Path(folder) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        _check_shapes(shapes, build_model(spec), spec, path)
        return with_weights(spec, load_file(str(path), device=str(device)), path, device), spec
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not loadable weights for {spec.arch} ({first_line(exc)})") from None


def with_weights(
    spec: ModelSpec, state: dict[str, torch.Tensor], path: Path, device: str | torch.device = "cpu"
) -> CifarResNet:
    """The network spec describes with `state` loaded into it, strictly, in eval mode on `device`: names and
    shapes are checked first (one line naming the first that does not fit; `path` names where they came from)."""
    model = build_model(spec)
    _check_shapes({k: tuple(v.shape) for k, v in state.items()}, model, spec, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path}: not loadable weights for {spec.arch} ({first_line(exc)})") from None
    return model.to(device).eval()


def _check_shapes(shapes: dict[str, tuple[int, ...]], model: nn.Module, spec: ModelSpec, path: Path) -> None:
    """One line naming the first tensor that does not fit the network model_config.json describes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    net = f"{CONFIG_FILE}'s network ({spec.num_classes} classes, {spec.norm} norm)"
    problems = [f"it lacks {k}, which {net} needs" for k in expected if k not in shapes]
    problems += [f"it holds {k!r:.80}, which {net} does not have" for k in shapes if k not in expected]
    problems += [
        f"{k} has shape {shapes[k]}; {net} needs {v}" for k, v in expected.items() if k in shapes and shapes[k] != v
    ]
    if problems:
        raise ModelError(f"{path}: not loadable weights for {spec.arch} ({problems[0]})")


def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class probabilities (N, C) in fp32 on the CPU for float images in [0, 1] (N, 3, 32, 32), batched, no grad,
    on the model's device, through the one inference loop: what the served model answers (tests compare the two)."""
    device = next(model.parameters()).device
    batches = ((images[i : i + batch_size], None) for i in range(0, len(images), batch_size))
    out = [torch.softmax(z, dim=1).cpu() for z, _ in inference.logits(model, batches, device, "fp32")]
    # nn.Module's __getattr__ is typed Tensor | Module; the head of every network here (ResNet.fc) is an nn.Linear
    return torch.cat(out) if out else torch.empty(0, len(cast(nn.Linear, model.fc).bias))
