"""Training you can watch: a fixed panel of test images, their predictions and GradCAM maps, computed every few
epochs so the MLflow UI shows attention forming over training. Knows nothing of MLflow."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cifar_mlflow import data, plots
from cifar_mlflow.analysis import gradcam
from cifar_mlflow.training import hardware

# layer3's 8x8 maps: on 32x32 images layer4's 4x4 maps are too coarse to show what the network looks at.
PANEL_LAYER = "layer3"
PANEL_KEY = "gradcam_panel"
# auto: about this many panels per run (plus the first and last epoch), whatever the number of epochs
AUTO_PANELS = 5


def panel_epochs(every: int, epochs: int) -> list[int]:
    """Epochs after which the panel is logged. every=0: none; -1 (auto): epoch 1, every ceil(epochs/5)-th and
    the last; N: every N-th epoch and the last."""
    if every == 0:
        return []
    step = max(1, math.ceil(epochs / AUTO_PANELS)) if every < 0 else every
    chosen = {e for e in range(step, epochs + 1, step)} | {epochs}
    if every < 0:
        chosen.add(1)
    return sorted(chosen)


def panel_indices(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The first test image of each class, in class order: the same images at every epoch and in every run."""
    firsts = [np.flatnonzero(labels == c)[:1] for c in range(num_classes)]
    return np.concatenate(firsts).astype(np.int64)


@dataclass(frozen=True)
class Panel:
    """What one panel shows; rendered later (off the training thread) by figure()."""

    images: np.ndarray  # uint8 (K, 32, 32, 3)
    maps: np.ndarray  # GradCAM (K, 32, 32) in [0, 1] for the predicted class
    true_names: Sequence[str]
    pred_names: Sequence[str]
    confidence: np.ndarray
    epoch: int

    def figure(self):
        return plots.watch_panel(
            self.images, self.maps, self.true_names, self.pred_names, self.confidence, self.epoch, PANEL_LAYER
        )


def compute_panel(
    model: nn.Module, split: data.Split, indices: np.ndarray, class_names: Sequence[str], epoch: int
) -> Panel:
    """Predictions and GradCAM for the panel images, on the eager (never compiled) model in fp32 eval mode.
    Called between epochs: the next epoch puts the model back in train mode and clears the gradients."""
    images = split.images[indices]
    x = hardware.to_device_images(torch.from_numpy(images), torch.device("cpu"))
    layer = dict(gradcam.resolve_layers(model, PANEL_LAYER))[PANEL_LAYER]
    maps, probs = gradcam.gradcam_of_predictions(model, layer, x)
    predicted = probs.argmax(axis=1)
    return Panel(
        images,
        maps,
        [class_names[i] for i in split.labels[indices]],
        [class_names[i] for i in predicted],
        probs.max(axis=1),
        epoch,
    )
