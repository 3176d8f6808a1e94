"""Networks for 32x32 inputs, built on torchvision's ResNet, and their safe on-disk format.

The model takes float32 images in [0, 1], shape (N, 3, 32, 32), and normalises them itself (mean/std are
buffers saved with the weights), so every client (serving, analysis, notebooks) sends raw pixels.
On disk a model is two files: `model_config.json` (architecture, classes, normalisation) and
`weights.safetensors` (tensors only: loading it cannot execute code, unlike a pickle).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from cifar_mlflow.errors import ModelError

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT_VERSION = 1
_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
GROUPS = 32   # GroupNorm's default group count (Wu & He 2018); every ResNet width (64..512) divides by it


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """batch: BatchNorm2d; group: GroupNorm(32); layer: GroupNorm(1), i.e. LayerNorm over (C, H, W)."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return partial(nn.GroupNorm, GROUPS)
    if norm == "layer":
        return partial(nn.GroupNorm, 1)
    raise ModelError(f"norm={norm!r} is not allowed: expected one of batch, group, layer")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights; saved as model_config.json."""

    arch: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    norm: str = "batch"
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class CifarResNet(ResNet):
    """torchvision ResNet with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool, so 32x32 inputs keep
    their resolution into layer1 (kuangliu/pytorch-cifar). `layer1..layer4` keep their torchvision names, so
    `model.layer4[-1]` is the obvious GradCAM target."""

    def __init__(self, layers: list[int], num_classes: int, mean: Sequence[float], std: Sequence[float],
                 norm: str = "batch") -> None:
        # No zero-init of the residual branches (torchvision's default; Goyal et al. 2017 use it to steady
        # 8k-image batches over 90 ImageNet epochs). Here the projection shortcuts are 1x1 stride-2 convs, so a
        # network whose branches start at zero sees only a stride-8 grid of 3x3 patches (121 of 1,024 pixels;
        # tests/test_models.py) until their BatchNorm scales grow, which a short schedule never gives them: on
        # real digits it learned to 0.31 in 6 epochs instead of 0.87 (benchmarks/RESULTS.md, recipe ablation).
        super().__init__(BasicBlock, layers, num_classes=num_classes, norm_layer=norm_layer(norm))
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images in [0, 1], (N, 3, 32, 32). Returns logits (N, num_classes)."""
        return super().forward((x - self.mean) / self.std)


def build_model(spec: ModelSpec) -> CifarResNet:
    if spec.arch not in _LAYERS:
        raise ModelError(f"arch={spec.arch!r} is not allowed: expected one of {', '.join(_LAYERS)}")
    return CifarResNet(_LAYERS[spec.arch], spec.num_classes, spec.mean, spec.std, spec.norm)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model_files(model: nn.Module, spec: ModelSpec, folder: Path) -> None:
    """Write model_config.json and weights.safetensors into folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(spec), indent=2))
    # safetensors wants contiguous tensors; channels_last conv weights are not, so copy to the default layout.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "cifar-mlflow", "arch": spec.arch})


def read_spec(folder: Path) -> ModelSpec:
    path = Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
        spec = ModelSpec(arch=raw["arch"], class_names=tuple(raw["class_names"]), mean=tuple(raw["mean"]),
                         std=tuple(raw["std"]), norm=raw.get("norm", "batch"),
                         format_version=int(raw.get("format_version", 0)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a valid model config ({exc})") from None
    if spec.format_version != FORMAT_VERSION:
        raise ModelError(f"{path}: format_version {spec.format_version} is not supported (expected {FORMAT_VERSION})")
    return spec


def load_model_files(folder: Path, device: str | torch.device = "cpu") -> tuple[CifarResNet, ModelSpec]:
    """Rebuild the model from model_config.json and load weights.safetensors into it (strictly, in eval mode).
    Nothing is unpickled: a file that is not a valid safetensors file is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    spec = read_spec(folder)
    model = build_model(spec)
    path = Path(folder) / WEIGHTS_FILE
    try:
        state = load_file(str(path), device=str(device))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not loadable weights for {spec.arch} ({first_line})") from None
    return model.to(device).eval(), spec


def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class probabilities (N, C) in fp32 for float images in [0, 1] (N, 3, 32, 32), batched, no grad."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, len(getattr(model, "fc").bias))
