"""GradCAM of a trained classifier: the target layers checked by name, and batched maps for the predicted and the
true class (grad-cam's GradCAM, backward only as far as the layer). Knows nothing of MLflow."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_mlflow.errors import ModelError


def resolve_layers(model: nn.Module, names: str) -> list[tuple[str, nn.Module]]:
    """The modules named in a comma-separated list (`layer3`, `layer4.1.conv2`, ...), each checked to output a
    convolutional feature map (N, C, H, W) with H, W > 1: GradCAM weighs such a map's channels, and has nothing to
    explain in a vector (`fc`) or a 1x1 map (`avgpool`). Checked with one forward pass of one blank image."""
    modules = dict(model.named_modules())
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in modules or name == "":
            top = ", ".join(n for n, _ in model.named_children())
            raise ModelError(
                f"target_layers: {name!r} is not a layer of this model; valid: {top} "
                f"(or a dotted path inside one, e.g. layer4.1.conv2)"
            )
        out.append((name, modules[name]))
    shapes = _output_shapes(model, out)
    for name, _ in out:
        shape = shapes.get(name)
        if shape is None or len(shape) != 4 or min(shape[2:]) < 2:
            valid = (
                ", ".join(
                    n for n, m in model.named_children() if len(shapes.get(n, ())) == 4 and min(shapes[n][2:]) >= 2
                )
                or "none"
            )
            raise ModelError(
                f"target_layers: {name!r} outputs {_describe(shape)}, not a convolutional feature map "
                f"that GradCAM can explain; valid: {valid} (or a dotted path inside one)"
            )
    return out


def _output_shapes(model: nn.Module, named: list[tuple[str, nn.Module]]) -> dict[str, tuple[int, ...]]:
    """Output shape of each named module and of each top-level child, for one blank 32x32 image."""
    wanted = {**dict(model.named_children()), **dict(named)}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:  # None: the output stays as it is
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in wanted.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def _describe(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "nothing (it is not called in the forward pass)"
    return f"shape {shape}" + (" (a vector per image)" if len(shape) == 2 else "")


def gradcam_maps(
    model: nn.Module, layer: nn.Module, images: torch.Tensor, classes: Sequence[int], batch_size: int = 64
) -> np.ndarray:
    """GradCAM maps (K, H, W) in [0, 1] for images (K, 3, H, W) in [0, 1], one per requested class.
    One GradCAM call per batch of images (not per image), in fp32, hooks released by the context manager.
    Never pass a torch.compile'd module: its hooks do not fire."""
    return _gradcam(model, layer, images, classes, batch_size)[0]


def gradcam_of_predictions(
    model: nn.Module, layer: nn.Module, images: torch.Tensor, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """GradCAM maps for each image's predicted class, and the class probabilities (K, C) of the same forward
    pass: one pass where predicting first and explaining after would take two."""
    return _gradcam(model, layer, images, None, batch_size)


def _gradcam(
    model: nn.Module, layer: nn.Module, images: torch.Tensor, classes: Sequence[int] | None, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(maps, probabilities); classes None: each image's predicted class."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = next(model.parameters()).device
    model.eval()
    maps, probs, swallowed = [], [], []
    with (
        torch.autocast(device_type=device.type, enabled=False),
        _backward_to(model, layer),
        GradCAM(model=model, target_layers=[layer]) as cam,
    ):
        try:
            for i in range(0, len(images), batch_size):
                x = images[i : i + batch_size].to(device, torch.float32)
                targets = (
                    None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes[i : i + batch_size]]
                )
                maps.append(cam(input_tensor=x, targets=targets))
                probs.append(torch.softmax(cam.outputs.detach().float(), dim=1).cpu().numpy())
        except IndexError as exc:  # grad-cam's __exit__ prints and swallows IndexError: the maps would be short
            swallowed.append(exc)
    if swallowed:
        raise swallowed[0]
    if not maps:
        return np.empty((0,) + tuple(images.shape[2:]), np.float32), np.empty((0, 0), np.float32)
    return np.concatenate(maps).astype(np.float32), np.concatenate(probs)


@contextlib.contextmanager
def _backward_to(model: nn.Module, layer: nn.Module) -> Iterator[None]:
    """GradCAM needs only d(class score)/d(layer's output). With every parameter outside `layer` frozen for the
    call, autograd skips the other layers' weight gradients and the whole backward below `layer` (the layer's
    own parameters keep its output in the graph, so GradCAM's gradient hook still fires): the same maps in about
    half the time of a full-backward call (benchmarks/RESULTS.md). Restored afterwards, also on error."""
    own = {id(p) for p in layer.parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in own] if own else []
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def gradcam_pairs(
    model: nn.Module,
    layer: nn.Module,
    images: torch.Tensor,
    predicted: Sequence[int],
    true: Sequence[int],
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Maps for the predicted class ("why it said X") and for the true class ("where Y was"), computed together:
    each GradCAM call takes a batch holding both, so it is still one call per batch."""
    k = len(images)
    both = gradcam_maps(
        model, layer, torch.cat([images, images]), list(predicted) + list(true), batch_size=2 * batch_size
    )
    return both[:k], both[k:]
