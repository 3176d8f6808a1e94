"""Figures as pure functions returning matplotlib Figures (no pyplot state, no show()); tracking logs them."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def training_curves(history: Sequence[dict[str, float]]) -> Figure:
    """Loss and accuracy per epoch, train and test on the same axes."""
    epochs = np.arange(1, len(history) + 1)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "cross-entropy loss"), (ax_acc, "accuracy", "accuracy")):
        for split, style in (("train", "o-"), ("test", "s-")):
            ax.plot(epochs, [h[f"{split}/{key}"] for h in history], style, label=split, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_ylim(0, 1)
    return fig


def image_grid(images: np.ndarray, titles: Sequence[str], ncols: int = 8, title: str = "") -> Figure:
    """uint8 HWC images in a grid, each titled (e.g. with its class name)."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(1.4 * ncols, 1.55 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, label in zip(axes, images, titles):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
