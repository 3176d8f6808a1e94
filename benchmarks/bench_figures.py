"""The image grids a run logs (augmented_samples.png with every training run and sweep trial; the analysis's
misclassified gallery and GradCAM figures), drawn as one canvas image with a caption per tile (the project) against
the way the notebooks draw them, a titled matplotlib axes per image laid out by the constrained-layout solver;
and every other figure of cifar_mlflow.plots. CPU seconds to draw and encode the PNG, median of interleaved runs.

    python -m benchmarks.bench_figures [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from matplotlib.figure import Figure

import benchmarks._common as common  # noqa: F401  (sets the environment first)
from benchmarks._common import interleaved, machine, median, table
from cifar_mlflow import plots

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def axes_per_image(images: np.ndarray, titles: list[str], ncols: int, title: str) -> Figure:
    """The notebook way: a subplot per image, each with set_title, layout="constrained"."""
    nrows = max(1, -(-len(images) // ncols))
    fig = Figure(figsize=(1.4 * ncols, 1.55 * nrows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, img, label in zip(axes, images, titles):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(label, fontsize=8)
    fig.suptitle(title)
    return fig


def cpu_seconds(draw) -> float:
    """CPU seconds to draw a figure and encode it as PNG (what log_figure does)."""
    start = time.process_time()
    draw().savefig(io.BytesIO(), format="png")
    return time.process_time() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    labels = [NAMES[i % 10] for i in range(32)]
    gallery = [f"{t} ->\n{p} ({c:.0%})" for t, p, c in zip(labels[:10], labels[1:11], np.linspace(0.5, 0.99, 10))]
    maps = rng.random((10, 32, 32), dtype=np.float32)

    def cam_tiles() -> np.ndarray:  # the overlays, as gradcam_figure computes them
        from pytorch_grad_cam.utils.image import show_cam_on_image

        panels = []
        for i in range(10):
            img = images[i].astype(np.float32) / 255.0
            panels += [images[i], show_cam_on_image(img, maps[i], True), show_cam_on_image(img, maps[9 - i], True)]
        return np.stack(panels)

    cam_titles = [t for i in range(10) for t in (gallery[i], f"why {labels[i + 1]}", f"where {labels[i]}")]
    grids = {
        "augmented samples (32 images)": (
            lambda: plots.image_grid(images, labels, title="augmented training samples"),
            lambda: axes_per_image(images, labels, 8, "augmented training samples"),
        ),
        "misclassified gallery (10 images)": (
            lambda: plots.misclassified_gallery(images[:10], labels[:10], labels[1:11], np.linspace(0.5, 0.99, 10)),
            lambda: axes_per_image(images[:10], gallery, 5, "misclassified test images, most confident first"),
        ),
        "GradCAM figure (10 images x 3 panels)": (
            lambda: plots.gradcam_figure(
                images[:10], maps, maps[::-1], labels[:10], labels[1:11], np.linspace(0.5, 0.99, 10), "layer4"
            ),
            lambda: axes_per_image(cam_tiles(), cam_titles, 12, "GradCAM at layer4"),
        ),
    }
    cm = rng.integers(0, 30, (10, 10))
    history = [{f"{s}/{k}": rng.random() for s in ("train", "test") for k in ("loss", "accuracy")} for _ in range(20)]
    others = {
        "training curves (20 epochs)": lambda: plots.training_curves(history),
        "LR schedule (2,000 steps)": lambda: plots.lr_schedule_figure(list(np.linspace(0, 0.2, 2000)), 100),
        "confusion matrix": lambda: plots.confusion_matrix_figure(cm, NAMES),
        "per-class accuracy": lambda: plots.per_class_accuracy_figure(rng.random(10), NAMES, 0.5),
        "LR range test": lambda: plots.lr_finder_figure(
            np.logspace(-5, 0, 100), rng.random(100) + 1, rng.random(100) + 1, 1e-2
        ),
    }
    contenders = {
        f"{name}|{side}": (lambda d=draw[i]: cpu_seconds(d))
        for name, draw in grids.items()
        for i, side in enumerate(("project", "axes"))
    }
    contenders |= {f"{name}|project": (lambda d=draw: cpu_seconds(d)) for name, draw in others.items()}
    interleaved(contenders, 1)  # warm-up: fonts, caches, grad-cam's import
    res = {k: median(v) for k, v in interleaved(contenders, args.repeats).items()}

    print(f"machine: {machine()}\n")
    print(f"CPU seconds to draw + encode each figure, median of {args.repeats} interleaved runs")
    rows = [
        [name, res[f"{name}|axes"], res[f"{name}|project"], res[f"{name}|axes"] / res[f"{name}|project"]]
        for name in grids
    ]
    rows += [[name, "", res[f"{name}|project"], ""] for name in others]
    print(table(["figure", "titled axes per image s", "project s", "speed-up"], rows))
    return res


if __name__ == "__main__":
    main()
