"""Run configuration: frozen dataclasses holding every parameter, its default, its reason and its allowed values.

This is the one place defaults live. The MLproject file and the click options are checked against these
dataclasses (tests/test_project_files.py); the click options are generated from them (cifar_mlflow/cli.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from cifar_mlflow.errors import ConfigError

ARCHS = ("resnet18", "resnet34")
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


def param(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    pattern: tuple[str, str] | None = None,
    also: tuple[str, ...] = (),
) -> Any:
    """A dataclass field that also carries the help text and the allowed values (used by validation and click).
    pattern: (regular expression the whole string must match, how to describe it to a user).
    also: words accepted besides the typed values (e.g. "auto" for the learning rate)."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "low": low,
            "high": high,
            "low_open": low_open,
            "high_open": high_open,
            "pattern": pattern,
            "also": also,
        },
    )


def allowed(f: dataclasses.Field) -> str:
    """Human description of what a field accepts, e.g. "one of sgd, adam" or "an integer >= 1"."""
    m = f.metadata
    if m["choices"]:
        return "one of " + ", ".join(m["choices"])
    if m["pattern"]:
        return m["pattern"][1]
    kind = {int: "an integer", float: "a number", str: "a non-empty string"}[field_type(f)]
    bounds = []
    if m["low"] is not None:
        bounds.append(f"{'>' if m['low_open'] else '>='} {m['low']:g}")
    if m["high"] is not None:
        bounds.append(f"{'<' if m['high_open'] else '<='} {m['high']:g}")
    also = "".join(f", or {word}" for word in m["also"])
    return kind + (" " + " and ".join(bounds) if bounds else "") + also


def field_type(f: dataclasses.Field) -> type:
    """The field's value type (int, float or str); `float | str` fields take a number or one of their words."""
    name = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "str": str, "float | str": float}[name]


def _check(f: dataclasses.Field, value: Any) -> Any:
    """Return the value coerced to the field's type, or raise ConfigError naming the field and what is allowed."""
    kind, m = field_type(f), f.metadata
    bad = ConfigError(f"{f.name}={value!r} is not allowed: expected {allowed(f)}")
    if isinstance(value, str) and value in m["also"]:
        return value
    if isinstance(value, bool):
        raise bad
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind is float and not math.isfinite(value)):
        raise bad
    if kind is str and (
        not value.strip()
        or (m["choices"] and value not in m["choices"])
        or (m["pattern"] and not re.fullmatch(m["pattern"][0], value))
    ):
        raise bad
    if m["low"] is not None and (value < m["low"] or (m["low_open"] and value == m["low"])):
        raise bad
    if m["high"] is not None and (value > m["high"] or (m["high_open"] and value == m["high"])):
        raise bad
    return value


class _Validated:
    """Validates and type-coerces every field of a frozen dataclass on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, _check(f, getattr(self, f.name)))

    def to_params(self) -> dict[str, Any]:
        """Every field as a flat dict: what gets logged as MLflow params (no hand-kept list)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class TrainConfig(_Validated):
    """Parameters of the `main` entry point. Defaults follow the short-schedule ResNet18 recipe (SGD + Nesterov,
    batch 512, one-cycle peaking early, weight decay 5e-4, label smoothing, pad-crop + flip + cutout). For this
    network with SGD + one-cycle and crop + flip, the Lightning CIFAR-10 baseline tutorial reports 92-93% test
    accuracy in 20-30 epochs and 93-94% in 40-50; this exact recipe has not been measured on CIFAR-10 here (the
    data cannot be downloaded on the machines it was built on). On real digits it is measured against the
    course-notebook loop: benchmarks/RESULTS.md."""

    epochs: int = param(
        20,
        "Passes over the training set; 20 is what the course assignments ask for, where one-cycle "
        "SGD reaches 92-93% with this network (Lightning's CIFAR-10 baseline).",
        low=1,
    )
    batch_size: int = param(
        512,
        "Images per step; 512 keeps a GPU busy and takes per-step overhead out of the epoch (Goyal et al. "
        "2017 train ResNets at up to 8k with the LR scaled linearly).",
        low=1,
    )
    lr: float | str = param(
        0.2,
        "Peak learning rate of the schedule; 0.2 = 0.1 per 256 images, He et al.'s 0.1 scaled linearly to "
        "batch 512 (Goyal et al. 2017). "
        "auto = run the LR range test first and use its suggestion (clamped to a safe range).",
        low=0.0,
        low_open=True,
        also=("auto",),
    )
    optimizer: str = param(
        "sgd",
        "Optimiser; SGD with Nesterov momentum (Sutskever et al. 2013): adaptive methods "
        "generalise worse on CIFAR image classifiers (Wilson et al. 2017).",
        choices=OPTIMIZERS,
    )
    momentum: float = param(
        0.9,
        "SGD momentum (Adam beta1); 0.9 as in He et al. 2016 and every recipe cited here.",
        low=0.0,
        high=1.0,
        high_open=True,
    )
    weight_decay: float = param(
        0.0005,
        "L2 weight decay; 5e-4 as in Wide ResNets (Zagoruyko & Komodakis 2016), kuangliu/pytorch-cifar and "
        "the Lightning baseline (He et al. 2016 used 1e-4 over 160 epochs).",
        low=0.0,
    )
    l1: float = param(
        0.0, "L1 penalty on conv/linear weights added to the loss; 0 = off (weight decay already regularises).", low=0.0
    )
    label_smoothing: float = param(
        0.1,
        "Label smoothing of the training loss; 0.1 as in Szegedy et al. 2016 (airbench uses 0.2 for CIFAR-10); "
        "train/loss and test/loss are reported without it.",
        low=0.0,
        high=1.0,
        high_open=True,
    )
    scheduler: str = param(
        "onecycle",
        "LR schedule; one-cycle (linear warm-up over the first 20%, then linear decay to ~0): fast "
        "convergence in short budgets (Smith & Topin 2019), the shape of Page's 24-epoch CIFAR-10 runs (2018). cosine: per-step cosine decay to 0; plateau: x0.1 when "
        "the test loss stalls for 2 epochs; cyclic: triangular2 between lr/10 and lr, 2-epoch half cycles.",
        choices=SCHEDULERS,
    )
    augment: str = param(
        "standard",
        "Augmentation preset; standard = reflect-pad 4 + random crop 32 and horizontal flip (He et al. "
        "2016), one 16x16 cutout centred anywhere (DeVries & Taylor 2017: the best size for CIFAR-10). See README "
        "for flip-cutout, heavy, rotate.",
        choices=AUGMENT_PRESETS,
    )
    arch: str = param(
        "resnet18", "Network: torchvision ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool).", choices=ARCHS
    )
    norm: str = param(
        "batch",
        "Normalisation layers; batch (Ioffe & Szegedy 2015), as every recipe cited here; group (32 groups, "
        "Wu & He 2018) and layer (GroupNorm with one group) do not depend on the batch size.",
        choices=NORMS,
    )
    seed: int = param(0, "Seed for weights, shuffling and augmentation; same seed = same run on CPU.", low=0)
    data_dir: str = param("data", "Folder holding (or receiving) cifar-10-batches-py/ or digits-batches-py/.")
    dataset: str = param(
        "cifar10",
        "cifar10 (read or downloaded); digits: scikit-learn's handwritten digits as 32x32 RGB in the "
        "CIFAR-10 layout, real images that need no download; synthetic: a generated 10-class set for speed runs "
        "(it proves plumbing, not learning).",
        choices=DATASETS,
    )
    max_train_samples: int = param(0, "Use only the first N training images (0 = all); for quick runs.", low=0)
    max_test_samples: int = param(0, "Use only the first N test images (0 = all); for quick runs.", low=0)
    num_workers: int = param(
        -1, "Data-loader worker processes; -1 = auto (one per spare core, at most 8, 0 on a single core).", low=-1
    )
    precision: str = param(
        "auto",
        "Compute precision; auto = bf16 autocast where the device runs it natively (CUDA with bf16, "
        "CPUs with AVX512-BF16/AMX), else fp32.",
        choices=PRECISIONS,
    )
    loader: str = param(
        "auto",
        "How training batches are made. device: the split lives on the training device as one uint8 "
        "tensor and is cropped, flipped and cut out there by batched tensor ops (presets standard, flip-cutout, "
        "none; no worker processes, no copy per batch); workers: albumentations in loader worker processes "
        "(every preset); auto = device on a GPU for the presets it has, else workers (on a CPU the workers "
        "augment beside the training threads).",
        choices=LOADERS,
    )
    compile: str = param(
        "false",
        "torch.compile the model for training and evaluation; pays off on a GPU over many epochs, costs "
        "a minute or more of compilation first. GradCAM and saved weights always use the uncompiled module.",
        choices=("false", "true"),
    )
    log_images_every: int = param(
        -1,
        "Log a panel of fixed test images with predictions and GradCAM (layer3) every N epochs and after the "
        "last, as MLflow images (step = epoch), to watch attention form; -1 = auto (epoch 1, about 5 more, the "
        "last), 0 = off.",
        low=-1,
    )
    registered_model_name: str = param(
        "cifar10-resnet18", "Registered model that receives a new version.", pattern=MODEL_NAME
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_loader(self)


# The presets that have a batched tensor version (augment.BATCH_RECIPES; kept here so config imports no torch).
DEVICE_PRESETS = ("standard", "flip-cutout", "none")


def check_loader(cfg: Any) -> None:
    """loader=device needs a preset with a batched version."""
    if cfg.loader == "device" and cfg.augment not in DEVICE_PRESETS:
        raise ConfigError(
            f"loader='device' is not allowed with augment={cfg.augment!r}: the device loader has "
            f"{', '.join(DEVICE_PRESETS)}; use loader=workers or auto"
        )


MODEL_URI_FORMS = "models:/<name>/<version>, models:/<name>@<alias>, models:/<logged model id> or runs:/<run id>/<path>"


@dataclass(frozen=True)
class AnalyzeConfig(_Validated):
    """Parameters of the `analyze` entry point."""

    model_uri: str = param(
        "models:/cifar10-resnet18@champion",
        "The model to analyse: a registered version, an alias or a run's model.",
        pattern=(r"(models:/[^/@\s]+(/[0-9]+|@[\w-]+)?|runs:/[0-9a-f]+/\S+)", MODEL_URI_FORMS),
    )
    num_images: int = param(
        25, "Misclassified images in the gallery and the GradCAM figures, most confident mistakes first.", low=1
    )
    target_layers: str = param(
        "layer3,layer4",
        "Comma-separated modules to explain with GradCAM; layer3 (8x8) and layer4 (4x4) are the "
        "last two stages, coarse-to-fine as in the course notebooks.",
        pattern=(r"[\w.]+(,[\w.]+)*", "comma-separated layer names"),
    )
    data_dir: str = param("data", "Folder holding (or receiving) cifar-10-batches-py/ or digits-batches-py/.")
    dataset: str = param(
        "auto",
        "Test data: auto = the dataset the model's training run used; or cifar10, digits, synthetic.",
        choices=ANALYZE_DATASETS,
    )
    max_test_samples: int = param(0, "Use only the first N test images (0 = all); for quick runs.", low=0)
    batch_size: int = param(
        0,
        "Images per evaluation/GradCAM batch; 0 = the training run's batch size, so the accuracy reproduces "
        "the training run's exactly.",
        low=0,
    )


def inherit(config: type, name: str) -> Any:
    """The same field (default, help, allowed values) as another config's: one place for each default."""
    f = config.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


# The range test sweeps far enough on both sides to see the loss start falling and then blow up.
@dataclass(frozen=True)
class LRFindConfig(_Validated):
    """Parameters of the `lr_find` entry point: the sweep, plus main's data, model and optimiser parameters."""

    start_lr: float = param(
        1e-5, "First learning rate of the exponential sweep (well below any useful LR).", low=0.0, low_open=True
    )
    end_lr: float = param(
        10.0, "Last learning rate of the sweep (well above where training diverges).", low=0.0, low_open=True
    )
    num_iter: int = param(
        100,
        "Sweep steps; 100 points over 6 decades put ~8 in each half-decade the suggestion fits a line through.",
        low=20,
    )
    batch_size: int = inherit(TrainConfig, "batch_size")
    optimizer: str = inherit(TrainConfig, "optimizer")
    momentum: float = inherit(TrainConfig, "momentum")
    weight_decay: float = inherit(TrainConfig, "weight_decay")
    l1: float = inherit(TrainConfig, "l1")
    label_smoothing: float = inherit(TrainConfig, "label_smoothing")
    augment: str = inherit(TrainConfig, "augment")
    arch: str = inherit(TrainConfig, "arch")
    norm: str = inherit(TrainConfig, "norm")
    seed: int = inherit(TrainConfig, "seed")
    data_dir: str = inherit(TrainConfig, "data_dir")
    dataset: str = inherit(TrainConfig, "dataset")
    max_train_samples: int = inherit(TrainConfig, "max_train_samples")
    num_workers: int = inherit(TrainConfig, "num_workers")
    precision: str = inherit(TrainConfig, "precision")
    loader: str = inherit(TrainConfig, "loader")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_loader(self)
        if self.end_lr <= self.start_lr:
            raise ConfigError(f"end_lr={self.end_lr!r} is not allowed: expected a number > start_lr={self.start_lr!r}")


# The pipeline's own parameters, besides those it passes through to its steps.
PIPELINE_STEPS = ("lr_find", "main", "analyze")


@dataclass(frozen=True)
class PipelineConfig(_Validated):
    """Parameters of the `pipeline` entry point: the range test's sweep, every training parameter but `lr`
    (the range test chooses it), the analysis' gallery and layers, and whether to reuse finished steps."""

    start_lr: float = inherit(LRFindConfig, "start_lr")
    end_lr: float = inherit(LRFindConfig, "end_lr")
    num_iter: int = inherit(LRFindConfig, "num_iter")
    epochs: int = inherit(TrainConfig, "epochs")
    batch_size: int = inherit(TrainConfig, "batch_size")
    optimizer: str = inherit(TrainConfig, "optimizer")
    momentum: float = inherit(TrainConfig, "momentum")
    weight_decay: float = inherit(TrainConfig, "weight_decay")
    l1: float = inherit(TrainConfig, "l1")
    label_smoothing: float = inherit(TrainConfig, "label_smoothing")
    scheduler: str = inherit(TrainConfig, "scheduler")
    augment: str = inherit(TrainConfig, "augment")
    arch: str = inherit(TrainConfig, "arch")
    norm: str = inherit(TrainConfig, "norm")
    seed: int = inherit(TrainConfig, "seed")
    data_dir: str = inherit(TrainConfig, "data_dir")
    dataset: str = inherit(TrainConfig, "dataset")
    max_train_samples: int = inherit(TrainConfig, "max_train_samples")
    max_test_samples: int = inherit(TrainConfig, "max_test_samples")
    num_workers: int = inherit(TrainConfig, "num_workers")
    precision: str = inherit(TrainConfig, "precision")
    loader: str = inherit(TrainConfig, "loader")
    compile: str = inherit(TrainConfig, "compile")
    log_images_every: int = inherit(TrainConfig, "log_images_every")
    registered_model_name: str = inherit(TrainConfig, "registered_model_name")
    num_images: int = inherit(AnalyzeConfig, "num_images")
    target_layers: str = inherit(AnalyzeConfig, "target_layers")
    reuse: str = param(
        "true",
        "Reuse a step whose FINISHED run with the same parameters and the same code exists (MLflow's "
        "multistep pattern) instead of running it again; false = always run every step.",
        choices=("true", "false"),
    )

    def steps(self) -> tuple[LRFindConfig, TrainConfig, AnalyzeConfig]:
        """The three steps' configs (validated): training's lr and analysis' model_uri are placeholders that
        the pipeline fills in from the earlier steps' results."""
        mine = self.to_params()

        def pick(config: type, **extra: Any) -> Any:
            return config(**{**{k: v for k, v in mine.items() if k in config.__dataclass_fields__}, **extra})

        return (
            pick(LRFindConfig),
            pick(TrainConfig),
            pick(AnalyzeConfig, model_uri=f"models:/{self.registered_model_name}/1", dataset=self.dataset),
        )
