"""Figures are pure functions: the right axes, lines and titles, renderable to PNG without a display."""

import io

import numpy as np

from cifar_mlflow import plots

HISTORY = [
    {"train/loss": 2.0 - e / 10, "test/loss": 2.1 - e / 10, "train/accuracy": e / 10, "test/accuracy": e / 11}
    for e in range(3)
]


def test_training_curves_have_train_and_test_per_epoch():
    fig = plots.training_curves(HISTORY)
    loss_ax, acc_ax = fig.axes
    for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"train", "test"}
        np.testing.assert_array_equal(lines["train"].get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(lines["test"].get_ydata(), [h[f"test/{key}"] for h in HISTORY])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_image_grid_titles_each_image():
    images = np.zeros((5, 32, 32, 3), np.uint8)
    fig = plots.image_grid(images, [f"cls{i}" for i in range(5)], ncols=4, title="t")
    assert len(fig.axes) == 8
    assert [ax.get_title() for ax in fig.axes][:5] == [f"cls{i}" for i in range(5)]
    assert all(not ax.images for ax in fig.axes[5:])
