"""Inspecting a trained classifier on a test split: predictions, the misclassified images (most confident first),
per-class statistics and the confusion matrix (GradCAM: gradcam.py). Knows nothing of MLflow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_mlflow.training import engine


@dataclass(frozen=True)
class Predictions:
    """Class probabilities (N, C) float32 and true labels (N,), plus the mean cross-entropy."""

    probs: np.ndarray
    labels: np.ndarray
    loss: float

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class."""
        return self.probs.max(axis=1)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.labels).mean()) if len(self.labels) else 0.0


def predict(model: nn.Module, loader: Any, device: torch.device, precision: str) -> Predictions:
    """Run the test split through engine.eval_logits (the one inference loop, as training's test metrics were),
    keeping every sample's probabilities. The loss is counted by engine.Tally, exactly as engine.evaluate does."""
    probs, labels = [], []
    tally = engine.Tally(device)
    for logits, y in engine.eval_logits(model, loader, device, precision, desc="analysis"):
        tally.add(logits, y)
        probs.append(torch.softmax(logits, dim=1))
        labels.append(y)
    return Predictions(torch.cat(probs).cpu().numpy(), torch.cat(labels).cpu().numpy(), tally.totals()[0])


def misclassified(pred: Predictions) -> np.ndarray:
    """Indices of the wrong predictions, most confident first (they teach the most), ties by index."""
    wrong = np.flatnonzero(pred.predicted != pred.labels)
    order = np.lexsort((wrong, -pred.confidence[wrong]))  # last key sorts first
    return wrong[order]


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (C, C): rows are true classes, columns predicted classes."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_stats(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class accuracy (= recall: the share of a class's images classified right), precision and support."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
    return {"accuracy": recall, "recall": recall, "precision": precision, "support": support}


def most_confused_pairs(cm: np.ndarray, class_names: Sequence[str], k: int = 10) -> list[tuple[str, str, int, float]]:
    """The k largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    pairs = []
    for i, j in zip(*np.unravel_index(flat, cm.shape)):
        if off[i, j] > 0:
            pairs.append((class_names[i], class_names[j], int(off[i, j]), float(off[i, j] / max(cm[i].sum(), 1))))
    return pairs
