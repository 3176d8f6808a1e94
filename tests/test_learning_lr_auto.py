"""lr=auto on real digits: the range test inside the run must point where SGD learns (before the fix it said
1.52e-5, the sweep's first decade, and the run then trained 3 epochs to 0.173), and the LR it resolves must train
as well as the hand-scaled default does in test_learning.py (same data, settings and budget)."""

import pytest

from cifar_mlflow import lr_finder
from tests.test_learning import LEARNS, digits_dir, train_on_digits  # noqa: F401 (digits_dir: a fixture)


def test_lr_auto_trains_as_well_as_the_scaled_default(store, digits_dir):  # noqa: F811
    run, history = train_on_digits(store, digits_dir, lr="auto")
    suggested = run.data.metrics["lr_find/suggested_lr"]
    resolved = float(run.data.params["lr/resolved"])
    assert resolved == pytest.approx(lr_finder.clamp_lr(suggested, "sgd"), rel=1e-9)
    # Measured: 0.0020 at this batch size (16; 40 steps, one pass over the 640 images), clamped to SGD's floor 0.01;
    # 0.0084 at batch 64 on all images. A sweep this short is noisy (at batch 32 the loss stays flat until it blows
    # up at ~0.03, and the rule said 3.5e-4), so the band is wide: above the sweep's first decade, where the old rule
    # landed, and below the blow-up. The rule itself is tested on a recorded 100-step curve (test_lr_finder.py).
    assert 1e-4 <= suggested <= 0.1, f"lr=auto suggested {suggested}"
    assert history[-1] >= LEARNS, f"lr=auto ({resolved:.3g}): test accuracy per epoch {history}"
