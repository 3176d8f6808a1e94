"""Run configuration: frozen dataclasses holding every parameter, its default, its reason and its allowed values
(the choices and ranges named in values.py); the sweep's own parameters are sweeps/sweep_config.py's.

This is the one place parameters are written. The click options are generated from these dataclasses
(cifar_mlflow/cli.py), and so are the MLproject's parameters and commands and the parameter tables of the docs/
pages (cifar_mlflow/params_doc.py, `python scripts/gen_params.py`); tests/test_project_files.py checks they agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cifar_mlflow import values
from cifar_mlflow.errors import ConfigError
from cifar_mlflow.fields import Composed, Validated, config, param

MODEL_URI_FORMS = "models:/<name>/<version>, models:/<name>@<alias>, models:/<logged model id> or runs:/<run id>/<path>"
DATA_FILES = (
    "cifar-10-batches-py/ is read from, or extracted to from the cifar-10-python.tar.gz put there or downloaded "
    "(digits-batches-py/ built in)"
)


# lr=scaled (TrainConfig.lr): the linear scaling rule from the batch-512 reference, the batch held to the range
# Goyal et al. 2017 validated (up to 8k, with the warm-up one-cycle has) and to >= 16 (BatchNorm).
REFERENCE_LR, REFERENCE_BATCH, SCALED_BATCHES = 0.2, 512, (16, 8192)


def scaled_lr(batch_size: int) -> float:
    """The peak LR lr=scaled resolves to at this (global) batch size."""
    low, high = SCALED_BATCHES
    return REFERENCE_LR * min(max(batch_size, low), high) / REFERENCE_BATCH


@config()
class TrainConfig(Validated):
    """Parameters of the `main` entry point. Defaults follow the short-schedule ResNet18 recipe (SGD + Nesterov,
    batch 512, one-cycle peaking early, weight decay 5e-4, label smoothing, pad-crop + flip + cutout). For this
    network with SGD + one-cycle and crop + flip, the Lightning CIFAR-10 baseline tutorial reports 92-93% test
    accuracy in 20-30 epochs and 93-94% in 40-50; this exact recipe has not been measured on CIFAR-10 here (the
    data cannot be downloaded on the machines it was built on). On real digits it is measured against the
    course-notebook loop: benchmarks/RESULTS.md."""

    epochs: int = param(
        20,
        "Passes over the training set; 20 is what the course assignments ask for: with this network, SGD and "
        "one-cycle, Lightning's CIFAR-10 baseline tutorial reports 92-93% in 20-30 epochs (93-94% in 40-50). This "
        "exact recipe has not been run on CIFAR-10 here (no download on the build machines); on real digits see "
        "docs/learning.md (*Does it learn?*).",
        low=1,
    )
    batch_size: int = param(
        512,
        "Images per step; 512 keeps a GPU busy and takes per-step overhead out of the epoch; ResNets train well "
        "far beyond it with the LR scaled linearly (Goyal et al. 2017).",
        low=1,
    )
    lr: float | str = param(
        "scaled",
        "Peak learning rate of the schedule. scaled = 0.2 x batch_size / 512: He et al.'s 0.1 per 256 images at "
        "the batch-512 reference, scaled linearly with the batch (Goyal et al. 2017), the batch held to 16-8192 "
        "(the range that rule was shown for; below 16 BatchNorm's statistics get noisy), logged as lr/resolved: "
        "0.025 at batch 64, 0.2 at 512. A number is taken as given. auto = run the LR range test first and use "
        "its suggestion (clamped to a safe range).",
        low=0.0,
        low_open=True,
        also=("auto", "scaled"),
    )
    optimizer: str = param(
        "sgd",
        "Optimiser; SGD with Nesterov momentum (Sutskever et al. 2013): adaptive methods "
        "generalise worse on CIFAR image classifiers (Wilson et al. 2017).",
        choices=values.OPTIMIZERS,
    )
    momentum: float = param(
        0.9,
        "SGD momentum (beta1 for Adam/AdamW); 0.9 as in He et al. 2016 and every recipe cited here.",
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
        "Label smoothing of the training loss; 0.1 as in Szegedy et al. 2016 (airbench uses 0.2 for CIFAR-10); in "
        "the digits ablation of the old recipe it made no difference (0.307 with, 0.300 without; "
        "benchmarks/RESULTS.md); train/loss and test/loss are reported without it.",
        low=0.0,
        high=1.0,
        high_open=True,
    )
    scheduler: str = param(
        "onecycle",
        "LR schedule; one-cycle (linear warm-up over the first 20% of steps, then linear decay to ~0): fast "
        "convergence in short budgets (Smith & Topin 2019), the shape of Page's 24-epoch CIFAR-10 runs (2018). "
        "cosine: per-step cosine decay to 0; plateau: x0.1 when the test loss stalls for 2 epochs; cyclic: "
        "triangular2 between lr/10 and lr, 2-epoch half cycles (docs/training.md: *Schedules*).",
        choices=values.SCHEDULERS,
    )
    augment: str = param(
        "standard",
        "Augmentation preset; standard = reflect-pad 4 + random crop 32 and horizontal flip (He et al. "
        "2016), one 16x16 cutout centred anywhere (DeVries & Taylor 2017: the best size for CIFAR-10). See "
        "docs/training.md (*Augmentation presets*) for flip-cutout, heavy, rotate.",
        choices=values.AUGMENT_PRESETS,
    )
    arch: str = param(
        "resnet18",
        "Network: torchvision ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool); 11,173,962 "
        "(resnet34: 21,282,122) parameters.",
        choices=values.ARCHS,
    )
    width: int = param(
        values.WIDTH,
        "Channels of layer1 (layer2-layer4: 2x, 4x, 8x); 64 is the published ResNet, the network every figure "
        "cited here is for. Compute grows with its square: 16 trains a run on a CPU several times faster "
        "(benchmarks/RESULTS.md), for quick experiments and the test suite. With norm=group, a multiple of 32.",
        low=values.WIDTHS[0],
        high=values.WIDTHS[1],
    )
    norm: str = param(
        "batch",
        "Normalisation layers; batch (Ioffe & Szegedy 2015), as every recipe cited here; group (GroupNorm with 32 "
        "groups, Wu & He 2018) and layer (GroupNorm with one group) do not depend on the batch size.",
        choices=values.NORMS,
    )
    seed: int = param(0, "Seed for weights, shuffling and augmentation; same seed = same run on CPU.", low=0)
    data_dir: str = param(
        "data",
        f"Folder where {DATA_FILES}; created if missing, and it must be writable if CIFAR-10 must be downloaded "
        "or digits built into it.",
    )
    dataset: str = param(
        "cifar10",
        "cifar10 (read or downloaded); digits: scikit-learn's handwritten digits as 32x32 RGB in the CIFAR-10 "
        "layout, real images built offline (docs/data.md); synthetic: a generated 10-class set for speed runs, "
        "learnable by any recipe (it proves plumbing, not learning).",
        choices=values.DATASETS,
    )
    max_train_samples: int = param(0, "Use only the first N training images (0 = all); for quick runs.", low=0)
    max_test_samples: int = param(0, "Use only the first N test images (0 = all); for quick runs.", low=0)
    num_workers: int = param(
        -1, "Data-loader worker processes; -1 = auto (one per spare core, at most 8, 0 on a single core).", low=-1
    )
    precision: str = param(
        "auto",
        "Compute precision; auto = bf16 autocast where the device runs it natively (CUDA with bf16, CPUs with "
        "AVX512-BF16/AMX), else fp32. bf16 or fp16 on a CPU without AVX512-BF16 is emulated, 10x or more slower: "
        "the run prints a warning and logs env/precision_emulated.",
        choices=values.PRECISIONS,
    )
    loader: str = param(
        "auto",
        "How training batches are made. device: the split lives on the training device as one uint8 "
        "tensor and is cropped, flipped and cut out there by batched tensor ops drawn from the same distributions "
        "as the albumentations presets (standard, flip-cutout, none; no worker processes, no copy per batch); "
        "workers: albumentations in loader worker processes (every preset); auto = device on a GPU for the "
        "presets it has, else workers (on a CPU the workers augment beside the training threads).",
        choices=values.LOADERS,
    )
    compile: bool = param(
        False,
        "torch.compile the model for training and evaluation; pays off on a GPU over many epochs, costs "
        "a minute or more of compilation first. GradCAM and saved weights always use the uncompiled module.",
    )
    log_images_every: int = param(
        -1,
        "Log a panel of fixed test images (one per class) with predictions and GradCAM (layer3) every N epochs and "
        "after the last, as MLflow images (step = epoch), to watch attention form; -1 = auto (epoch 1, about 5 "
        "more, the last), 0 = off.",
        low=-1,
    )
    registered_model_name: str = param(
        "cifar10-resnet18",
        "Registered model that receives each new version; the name goes into model URIs and registry searches, "
        "where /, @, quotes and spaces break.",
        pattern=values.MODEL_NAME,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        values.check_loader(self)
        values.check_width(self.width, self.norm)


@config()
class AnalyzeConfig(Validated):
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
        "Comma-separated modules to explain with GradCAM, each one whose output is a feature map (N, C, H, W) "
        "with H, W > 1: conv1, bn1, relu, maxpool, layer1-layer4, or a dotted path inside one (layer4.1.conv2); "
        "layer3 (8x8) and layer4 (4x4) are the last two stages, coarse-to-fine as in the course notebooks.",
        pattern=(r"[\w.]+(,[\w.]+)*", "comma-separated layer names"),
    )
    data_dir: str = param("data", f"Folder where the test split's {DATA_FILES}.")
    dataset: str = param(
        "auto",
        "Test data: auto = the dataset the model's training run used; or cifar10, digits, synthetic.",
        choices=values.ANALYZE_DATASETS,
    )
    max_test_samples: int = param(0, "Analyse only the first N test images (0 = all); for quick runs.", low=0)
    batch_size: int = param(
        0,
        "Images per evaluation/GradCAM batch; 0 = the training run's batch size, so the accuracy reproduces "
        "the training run's exactly.",
        low=0,
    )


# What the range test shares with training: data, model and optimiser, not the schedule or the run's length.
LR_FIND_SHARED = (
    "batch_size optimizer momentum weight_decay l1 label_smoothing augment arch width norm seed data_dir dataset "
    "max_train_samples num_workers precision loader"
).split()


# The range test sweeps far enough on both sides to see the loss start falling and then blow up.
@config((TrainConfig, LR_FIND_SHARED), own_first=True)
class LRFindConfig(Composed):
    """Parameters of the `lr_find` entry point: the sweep, plus main's data, model and optimiser parameters."""

    start_lr: float = param(
        1e-5, "First learning rate of the exponential sweep (well below any useful LR).", low=0.0, low_open=True
    )
    end_lr: float = param(
        10.0,
        "Last learning rate of the sweep (well above where training diverges); it must exceed start_lr.",
        low=0.0,
        low_open=True,
    )
    num_iter: int = param(
        100,
        "Sweep steps; 100 points over 6 decades put ~8 in each half-decade the suggestion fits a line through.",
        low=20,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        values.check_loader(self)
        values.check_width(self.width, self.norm)
        if self.end_lr <= self.start_lr:
            raise ConfigError(f"end_lr={self.end_lr!r} is not allowed: expected a number > start_lr={self.start_lr!r}")


@config(
    (LRFindConfig, ["start_lr", "end_lr", "num_iter"]),
    (TrainConfig, [name for name in TrainConfig.__dataclass_fields__ if name != "lr"]),
    (AnalyzeConfig, ["num_images", "target_layers"]),
)
class PipelineConfig(Composed):
    """Parameters of the `pipeline` entry point: the range test's sweep, every training parameter but `lr`
    (the range test chooses it), the analysis' gallery and layers, and whether to reuse finished steps."""

    reuse: bool = param(
        True,
        "Reuse a step whose FINISHED run with the same parameters and the same code version exists (MLflow's "
        "multistep pattern) instead of running it again; false = always run every step.",
    )

    def steps(self) -> tuple[LRFindConfig, TrainConfig, AnalyzeConfig]:
        """The three steps' configs (validated): training's lr and analysis' model_uri are placeholders that
        the pipeline fills in from the earlier steps' results."""
        mine = dataclasses.asdict(self)

        def pick(step: type[Any], **extra: Any) -> Any:  # step: one of the config dataclasses
            return step(**{**{k: v for k, v in mine.items() if k in step.__dataclass_fields__}, **extra})

        return (
            pick(LRFindConfig),
            pick(TrainConfig),
            pick(AnalyzeConfig, model_uri=f"models:/{self.registered_model_name}/1", dataset=self.dataset),
        )
