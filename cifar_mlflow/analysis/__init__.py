"""Inspecting a trained model, knowing nothing of MLflow: predictions and per-class statistics, GradCAM maps, and the
GradCAM panel a training run logs on chosen epochs."""
