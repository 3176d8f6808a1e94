"""Figures as pure functions returning matplotlib Figures (no pyplot state, no show()); tracking logs them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TILE_INCHES = 1.2  # the width of one image of a grid in the PNG (at the default 100 dpi: 120 pixels)


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
    return _mosaic(list(images), titles, ncols, title, fontsize=8)


def _mosaic(tiles: Sequence[np.ndarray], captions: Sequence[str], ncols: int, title: str, *, fontsize: float) -> Figure:
    """Equal-sized uint8 HWC tiles in rows of `ncols` on one white canvas, each captioned just above it, `title`
    over all: one image and one text per tile. (A titled axes per tile made matplotlib measure and place every
    one of them: 1.2-1.7 CPU-s for 32 images, against ~0.2 s this way; benchmarks/RESULTS.md.)"""
    n = len(tiles)
    h, w = tiles[0].shape[:2] if n else (32, 32)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    inch = TILE_INCHES / w  # inches per canvas pixel
    lines = max((c.count("\n") + 1 for c in captions), default=1)
    band = int(np.ceil(lines * fontsize * 1.25 / 72 / inch)) + 1  # canvas rows for a caption
    gap = max(2, round(0.12 * w))
    cell_w, cell_h = w + gap, band + h + gap
    canvas = np.full((nrows * cell_h, ncols * cell_w, 3), 255, np.uint8)
    head = 0.45 if title else 0.0  # inches above the canvas for the title
    fig = Figure(figsize=(canvas.shape[1] * inch, canvas.shape[0] * inch + head))
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] * inch / fig.get_figheight()))
    ax.set_axis_off()
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        row, col = divmod(i, ncols)
        top, left = row * cell_h + gap // 2 + band, col * cell_w + gap // 2
        canvas[top : top + h, left : left + w] = tile if tile.ndim == 3 else tile[..., None]
        ax.text(left + w / 2 - 0.5, top - 1, caption, ha="center", va="bottom", fontsize=fontsize, linespacing=1.1)
    ax.imshow(canvas, interpolation="nearest")
    if title:
        fig.suptitle(title, y=1 - 0.1 / fig.get_figheight(), va="top")
    return fig


def misclassified_gallery(
    images: np.ndarray,
    true_names: Sequence[str],
    pred_names: Sequence[str],
    confidence: Sequence[float],
    ncols: int = 5,
) -> Figure:
    """Misclassified images, each titled `true -> predicted (confidence)`."""
    titles = [f"{t} ->\n{p} ({c:.0%})" for t, p, c in zip(true_names, pred_names, confidence)]
    return image_grid(images, titles, ncols=ncols, title="misclassified test images, most confident first")


def gradcam_figure(
    images: np.ndarray,
    pred_maps: np.ndarray,
    true_maps: np.ndarray,
    true_names: Sequence[str],
    pred_names: Sequence[str],
    confidence: Sequence[float],
    layer: str,
    per_row: int = 4,
) -> Figure:
    """For each image three panels: the image, GradCAM for the predicted class ("why it said X") and GradCAM
    for the true class ("where Y was")."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    tiles, captions = [], []
    for i in range(len(images)):
        img = images[i].astype(np.float32) / 255.0
        tiles += [
            images[i],
            show_cam_on_image(img, pred_maps[i], use_rgb=True),
            show_cam_on_image(img, true_maps[i], use_rgb=True),
        ]
        captions += [
            f"{true_names[i]} ->\n{pred_names[i]} ({confidence[i]:.0%})",
            f"why {pred_names[i]}",
            f"where {true_names[i]}",
        ]
    return _mosaic(
        tiles, captions, 3 * per_row, f"GradCAM at {layer}: image | predicted class | true class", fontsize=7
    )


def confusion_matrix_figure(cm: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix (each row sums to 1: where that class's images went)."""
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    fig = Figure(figsize=(1.0 + 0.75 * k, 0.6 + 0.7 * k), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if norm[i, j] >= 0.005:
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion matrix (rows normalised)")
    return fig


def per_class_accuracy_figure(
    accuracy: Sequence[float] | np.ndarray, class_names: Sequence[str], overall: float
) -> Figure:
    fig = Figure(figsize=(max(6.0, 0.7 * len(class_names)), 3.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(range(len(class_names)), accuracy, color="tab:blue")
    ax.bar_label(bars, [f"{a:.0%}" for a in accuracy], fontsize=7)
    ax.axhline(overall, color="tab:red", linestyle="--", label=f"overall {overall:.1%}")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("per-class test accuracy")
    ax.legend(loc="lower right")
    return fig


def lr_finder_figure(
    lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggested: float
) -> Figure:
    """Range-test curve: raw and smoothed loss against the learning rate (log axis), suggestion marked."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(lrs, losses, color="0.75", linewidth=1, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", label="smoothed loss (centred linear fit)")
    ax.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested lr {suggested:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [v for v in smoothed if np.isfinite(v)]
    if finite:  # keep the divergence spike from flattening the useful part of the curve
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 3 * finite[0]) * 1.05)
    ax.set_title("LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def lr_schedule_figure(lr_steps: Sequence[float], steps_per_epoch: int) -> Figure:
    """The learning rate of every optimiser step, with the epoch on the x axis."""
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(1, len(lr_steps) + 1) / max(steps_per_epoch, 1), lr_steps, color="tab:green")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate per step")
    ax.grid(alpha=0.3)
    return fig


def watch_panel(
    images: np.ndarray,
    maps: np.ndarray,
    true_names: Sequence[str],
    pred_names: Sequence[str],
    confidence: Sequence[float],
    epoch: int,
    layer: str,
    per_row: int = 5,
) -> Figure:
    """The fixed test images, each above its GradCAM for the predicted class, titled with the prediction: green
    when right, red when wrong. Logged every few epochs to watch attention form. Near-square (rows of 5), so
    that the MLflow UI's 256-pixel preview stays legible."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    n = len(images)
    rows = max(1, -(-n // per_row))
    width, height = 1.3 * per_row + 0.2, 2.75 * rows + 0.4
    # A fixed grid, not layout="constrained": the solver measured 20 titled axes on every panel (70% of 0.4 s
    # rendering); these margins leave room for the labels at fontsize 8 and the suptitle.
    fig = Figure(figsize=(width, height))
    axes = np.array(
        fig.subplots(
            2 * rows,
            per_row,
            gridspec_kw=dict(
                left=0.1 / width,
                right=1 - 0.1 / width,
                bottom=0.05 / height,
                top=1 - 0.45 / height,
                wspace=0.1,
                hspace=0.25,
            ),
        )
    ).reshape(2 * rows, per_row)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        row, col = divmod(i, per_row)
        right = true_names[i] == pred_names[i]
        top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
        top.imshow(images[i], interpolation="nearest")
        cam = show_cam_on_image(images[i].astype(np.float32) / 255.0, maps[i], use_rgb=True)
        bottom.imshow(cam, interpolation="nearest")
        # text, not set_title: placing a title measures the (hidden) tick labels at every draw
        for ax, text, color in (
            (top, true_names[i], "black"),
            (bottom, f"{pred_names[i]} {confidence[i]:.0%}", "tab:green" if right else "tab:red"),
        ):
            ax.text(0.5, 1.03, text, transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color=color)
    fig.suptitle(
        f"epoch {epoch}: test image over GradCAM ({layer}) for the predicted class",
        fontsize=9,
        y=1 - 0.12 / height,
        va="top",
    )
    return fig
