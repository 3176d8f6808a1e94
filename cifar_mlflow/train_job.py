"""The training job end to end: config -> data -> model -> fit, with every step reported through tracking."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cifar_mlflow import augment, data, engine, models, plots, tracking
from cifar_mlflow.config import TrainConfig

SAMPLE_GRID = 32   # augmented training images shown in augmented_samples.png


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    metrics: dict[str, float]
    version: tracking.RegisteredVersion


def run_training(cfg: TrainConfig) -> TrainOutcome:
    # Everything that can fail on bad input (data, model) happens before the run is opened.
    device = engine.resolve_device()
    precision = engine.resolve_precision(cfg.precision, device)
    dataset = data.load_dataset(cfg.dataset, cfg.data_dir, cfg.max_train_samples, cfg.max_test_samples)
    if len(dataset.train) < 2 or len(dataset.test) < 1:
        raise data.DataError(f"{dataset.source}: need at least 2 training and 1 test image, "
                             f"got {len(dataset.train)} and {len(dataset.test)}")
    mean, std = data.channel_stats(dataset.train.images)
    engine.seed_everything(cfg.seed)
    spec = models.ModelSpec(cfg.arch, dataset.class_names, mean, std)
    model = models.build_model(spec)
    summary = _model_summary(model)
    model = model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed 32x32 shapes: let cuDNN pick the fastest kernels once
    transform = augment.build_train_transform(cfg.augment, mean)
    workers = data.auto_num_workers(cfg.num_workers)
    pin = device.type == "cuda"
    train_loader = data.make_loader(dataset.train, batch_size=cfg.batch_size, train=True, transform=transform,
                                    seed=cfg.seed, num_workers=workers, pin_memory=pin)
    test_loader = data.make_loader(dataset.test, batch_size=cfg.batch_size, train=False,
                                   num_workers=workers, pin_memory=pin)

    with tracking.open_run() as run:
        tracking.log_params({**cfg.to_params(), **{
            "model/num_params": models.num_parameters(model), "data/train_size": len(dataset.train),
            "data/test_size": len(dataset.test), "data/mean": mean, "data/std": std,
            "env/device": _device_name(device), "env/precision": precision, "env/num_workers": workers,
            **{f"env/{k}_version": v for k, v in tracking.versions().items()}}})
        tracking.log_dataset(dataset, dataset.train, "training")
        tracking.log_dataset(dataset, dataset.test, "evaluation")
        tracking.log_text(summary, "model_summary.txt")
        tracking.log_text(augment.describe(transform), "augmentations.txt")
        tracking.log_figure(_augmented_grid(train_loader, dataset.class_names), "augmented_samples.png")

        result = engine.fit(model, train_loader, test_loader, cfg, device, precision,
                            on_epoch_end=tracking.log_epoch)
        tracking.log_figure(plots.training_curves(result.history), "curves.png")

        example = dataset.test.images[:2].transpose(0, 3, 1, 2).astype("float32") / 255.0
        version = tracking.log_and_register_model(
            model, spec, example, cfg.registered_model_name, result.final["test/accuracy"], cfg.epochs)
        _print_summary(result.final, version, tracking.run_url(run))
        return TrainOutcome(run.info.run_id, result.final, version)


def _model_summary(model: torch.nn.Module) -> str:
    from torchinfo import summary

    return str(summary(model, input_size=(1, 3, 32, 32), device="cpu", verbose=0,
                       col_names=("output_size", "num_params")))


def _device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _augmented_grid(loader, class_names):
    """The first training batch of epoch 1 exactly as the model will see it (before normalisation)."""
    sampler = loader.sampler
    sampler.set_epoch(1)
    keys = list(iter(sampler))[:SAMPLE_GRID]
    images, labels = loader.dataset.__getitems__(keys)
    return plots.image_grid(images.numpy(), [class_names[i] for i in labels.tolist()],
                            title="augmented training samples")


def _print_summary(final: dict[str, float], version: tracking.RegisteredVersion, url: str) -> None:
    print("\n".join([
        "", "training finished",
        f"  test accuracy {final['test/accuracy']:.4f}   test loss {final['test/loss']:.4f}",
        f"  registered {version.model_uri}" + ("  (now @champion)" if version.is_champion else ""),
        f"  view: {url}", ""]))
