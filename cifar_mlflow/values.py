"""The values parameters may take, shared by the configs (config.py, sweeps/sweep_config.py) and the code that builds
what a value names: architectures, widths and norms (models.py, which reads a model's own config file with the same
checks), optimisers and schedules, augmentation presets, datasets, precisions and loaders. Imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

from cifar_mlflow.errors import ConfigError

ARCHS = ("resnet18", "resnet34")
# ResNet's published width: 64 channels in layer1 (128, 256, 512 after). GroupNorm's 32 groups must divide it.
WIDTH, WIDTHS, GROUPNORM_GROUPS = 64, (8, 512), 32
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("onecycle", "cosine", "plateau", "cyclic", "none")
AUGMENT_PRESETS = ("standard", "flip-cutout", "heavy", "rotate", "none")
NORMS = ("batch", "group", "layer")
DATASETS = ("cifar10", "digits", "synthetic")
ANALYZE_DATASETS = ("auto",) + DATASETS
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOADERS = ("auto", "device", "workers")

# Registered model names as this project writes them into model URIs (models:/<name>/<version>) and MLflow's
# search filters: MLflow itself refuses '/' and ':'; '@' would read as an alias, quotes and spaces break both.
MODEL_NAME = (
    r"[A-Za-z0-9][A-Za-z0-9_.-]{0,255}",
    "letters, digits, '_', '-' and '.', starting with a letter or digit (at most 256 characters)",
)


# The presets that have a batched tensor version (augment.BATCH_RECIPES; kept here so config imports no torch).
DEVICE_PRESETS = ("standard", "flip-cutout", "none")


def check_width(width: int, norm: str, error: type[Exception] = ConfigError, where: str = "") -> None:
    """The width a network can be built with (its type and range are the field's; a model's config is read here
    too, hence `error` and `where`)."""
    if type(width) is not int or not WIDTHS[0] <= width <= WIDTHS[1]:
        raise error(f"{where}width={width!r:.40} is not allowed: expected an integer from {WIDTHS[0]} to {WIDTHS[1]}")
    if norm == "group" and width % GROUPNORM_GROUPS:
        raise error(
            f"{where}width={width} is not allowed with norm='group': GroupNorm's {GROUPNORM_GROUPS} groups need a "
            f"multiple of {GROUPNORM_GROUPS}"
        )


def check_loader(cfg: Any) -> None:
    """loader=device needs a preset with a batched version."""
    if cfg.loader == "device" and cfg.augment not in DEVICE_PRESETS:
        raise ConfigError(
            f"loader='device' is not allowed with augment={cfg.augment!r}: the device loader has "
            f"{', '.join(DEVICE_PRESETS)}; use loader=workers or auto"
        )
