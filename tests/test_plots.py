"""Figures are pure functions: the right axes, lines and titles, renderable to PNG without a display."""

import io

import numpy as np

from cifar_mlflow import plots

HISTORY = [
    {"train/loss": 2.0 - e / 10, "test/loss": 2.1 - e / 10, "train/accuracy": e / 10, "test/accuracy": e / 11}
    for e in range(3)
]


def _renders_png(fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_training_curves_have_train_and_test_per_epoch():
    fig = plots.training_curves(HISTORY)
    loss_ax, acc_ax = fig.axes
    for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"train", "test"}
        np.testing.assert_array_equal(lines["train"].get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(lines["test"].get_ydata(), [h[f"test/{key}"] for h in HISTORY])
    _renders_png(fig)


def test_image_grid_places_each_image_under_its_title():
    """One canvas image, each input exactly (pixel for pixel) in reading order, its caption centred just above it."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    fig = plots.image_grid(images, [f"cls{i}" for i in range(5)], ncols=4, title="t")
    (ax,) = fig.axes
    (canvas,) = ax.images
    pixels = np.asarray(canvas.get_array())
    captions = [(t.get_text(), t.get_position()) for t in ax.texts]
    assert [c for c, _ in captions] == [f"cls{i}" for i in range(5)] and fig.get_suptitle() == "t"
    tops = []
    for i, (_, (x, y)) in enumerate(captions):
        top, left = int(y) + 1, int(x + 0.5) - 16  # the caption's anchor: centred, one pixel above the image
        np.testing.assert_array_equal(pixels[top : top + 32, left : left + 32], images[i])
        tops.append(top)
    assert tops[:4] == [tops[0]] * 4 and tops[4] > tops[0]  # rows of four, the fifth below
    assert (pixels[: tops[0] - 1] == 255).all()  # white above the first row: room for the captions
    _renders_png(fig)


def test_gradcam_figure_shows_image_and_both_maps_captioned():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    maps = rng.random((2, 32, 32), dtype=np.float32)
    fig = plots.gradcam_figure(images, maps, maps[::-1], ["cat", "dog"], ["dog", "dog"], [0.9, 0.8], "layer3")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == [
        "cat ->\ndog (90%)",
        "why dog",
        "where cat",
        "dog ->\ndog (80%)",
        "why dog",
        "where dog",
    ]
    assert fig.get_suptitle() == "GradCAM at layer3: image | predicted class | true class"
    pixels = np.asarray(ax.images[0].get_array())
    x, y = ax.texts[3].get_position()
    np.testing.assert_array_equal(pixels[int(y) + 1 :][:32, int(x + 0.5) - 16 :][:, :32], images[1])
