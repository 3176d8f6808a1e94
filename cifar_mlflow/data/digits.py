"""The `digits` dataset: scikit-learn's bundled handwritten digits upscaled to 32x32 RGB, a real image set that
needs no download, written once into data_dir in the CIFAR-10 layout and then read by the same reader.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from cifar_mlflow.data.cifar_files import TEST_FILE, write_layout
from cifar_mlflow.data.data_dir import not_writable, writable_folder
from cifar_mlflow.data.dataset import NUM_CLASSES, Split
from cifar_mlflow.data.safe_pickle import load_pickle
from cifar_mlflow.errors import DataError

# The real offline set: scikit-learn's bundled handwritten digits (1,797 8x8 images of 0-16 ink counts, the UCI
# "optdigits" test set), written once into this folder of data_dir in the CIFAR-10 layout and then read by the
# same reader as CIFAR-10.
DIGITS_LAYOUT = "digits-batches-py"
DIGITS_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Test split: 30 images of each class drawn with a fixed seed (300 in all, the rest train), so the split is the
# same everywhere and both splits mix all 13 writers. (Scikit-learn's order groups writers: its last 300 images
# are mostly hands the first 1,497 lack, a test of those few writers on which even an RBF SVM reaches only 0.95,
# against 0.99 on a stratified split; benchmarks/RESULTS.md.)
DIGITS_TEST_PER_CLASS = 30
DIGITS_SPLIT_SEED = 0
DIGITS_SCALE = 4  # 8x8 -> 32x32, the input size of every model here
# The test batch's label names the split rule, so that a folder an older version built with another split
# (before 2026-11-23: scikit-learn's last 300 images, whose label was plain "testing batch 1 of 1") is noticed
# and rebuilt instead of silently giving other test figures.
DIGITS_TEST_LABEL = f"testing batch 1 of 1 (digits split: {DIGITS_TEST_PER_CLASS} per class, seed {DIGITS_SPLIT_SEED})"


def digits_splits() -> tuple[Split, Split]:
    """scikit-learn's handwritten digits as 32x32 RGB uint8: ink counts 0-16 scaled to 0-255, upscaled 4x
    bilinearly (smooth strokes, as a photographed digit would have, rather than 4x4 blocks), grey in all three
    channels. Test = 30 images per class drawn with a fixed seed, train = the other 1,497; both keep
    scikit-learn's order."""
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = 8 * DIGITS_SCALE
    big = np.stack(
        [
            cv2.resize(img.astype(np.float32) * (255.0 / 16.0), (size, size), interpolation=cv2.INTER_LINEAR)
            for img in digits.images
        ]
    )
    grey = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    images = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=3))
    labels = digits.target.astype(np.int64)
    is_test = digits_test_mask(labels)
    return Split(images[~is_test], labels[~is_test]), Split(images[is_test], labels[is_test])


def digits_test_mask(labels: np.ndarray) -> np.ndarray:
    """Which of scikit-learn's digits are in the test split: 30 per class, drawn with a fixed seed."""
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    is_test = np.zeros(len(labels), bool)
    for c in range(NUM_CLASSES):
        is_test[rng.choice(np.flatnonzero(labels == c), DIGITS_TEST_PER_CLASS, replace=False)] = True
    return is_test


def is_current(folder: Path) -> bool:
    """Was `folder` built with today's split rule (its test batch's label says so)?"""
    try:
        label = load_pickle(Path(folder) / TEST_FILE).get("batch_label")
    except DataError:
        return False  # unreadable: rebuilt, like any folder an older version left
    return label in (DIGITS_TEST_LABEL, DIGITS_TEST_LABEL.encode())


def build_digits(root: Path) -> Path:
    """Create `root/digits-batches-py/` from scikit-learn's bundled digits (offline, about a second); a folder
    built with another split rule is replaced (moved aside first, so that a concurrent reader never sees half)."""
    root, purpose = Path(root), "the digits set cannot be written into it"
    folder = root / DIGITS_LAYOUT
    writable_folder(root, DIGITS_LAYOUT, purpose)
    try:
        if folder.is_dir():
            print(
                f"note: {folder} was built by an older cifar-mlflow (its test batch does not name today's split rule); rebuilding it",
                file=sys.stderr,
            )
            aside = Path(tempfile.mkdtemp(dir=root, prefix=f".{DIGITS_LAYOUT}-old-"))
            try:
                folder.rename(aside / DIGITS_LAYOUT)
            except FileNotFoundError:
                pass  # another process moved it first
            shutil.rmtree(aside, ignore_errors=True)
        return write_layout(folder, *digits_splits(), DIGITS_CLASSES, test_label=DIGITS_TEST_LABEL)
    except OSError as exc:  # disk full, quota: nothing half-written is left (write_layout)
        raise not_writable(root, exc.strerror or str(exc), DIGITS_LAYOUT, purpose) from None
