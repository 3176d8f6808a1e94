"""The `analyze` entry point's work: load a registered model version, evaluate it on the test split and log
misclassified images, GradCAM overlays, a confusion matrix and per-class statistics to a run of its own."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cifar_mlflow import data, plots
from cifar_mlflow.analysis import gradcam, predictions
from cifar_mlflow.config import AnalyzeConfig
from cifar_mlflow.errors import DataError
from cifar_mlflow.tracking import lineage, notes, runs, serving, store
from cifar_mlflow.training import hardware

DEFAULT_BATCH = 256  # when the training run's batch size is unknown (runs logged elsewhere)
CONFUSED_PAIRS = 10


@dataclass(frozen=True)
class AnalyzeOutcome:
    run_id: str
    accuracy: float
    num_misclassified: int


def run_analysis(cfg: AnalyzeConfig) -> AnalyzeOutcome:
    # Resolve, load and check everything before the run is opened: bad input leaves nothing half-written.
    client = store.new_client()  # the analysis run's: the model's lineage is read with it before the run opens
    ref = lineage.resolve_model(client, cfg.model_uri)
    trained_with = lineage.run_params(client, ref.run_id)
    device = hardware.resolve_device()
    # The training run's precision and batch size, so that the accuracy reproduces the training run's exactly.
    precision = trained_with.get("env/precision") or hardware.resolve_precision("auto", device)
    batch_size = cfg.batch_size or int(trained_with.get("batch_size", DEFAULT_BATCH))
    dataset_name = trained_with.get("dataset", "cifar10") if cfg.dataset == "auto" else cfg.dataset
    # the model first: one that is not ours is refused before any dataset is read, built or downloaded
    model, spec = serving.load_torch_model(ref.uri, device=str(device))
    dataset = data.load_dataset(dataset_name, cfg.data_dir, max_test=cfg.max_test_samples, test_only=True)
    if tuple(spec.class_names) != tuple(dataset.class_names):
        raise DataError(
            f"dataset={dataset_name}: its classes {list(dataset.class_names)} are not the model's "
            f"{list(spec.class_names)}"
        )
    layers = gradcam.resolve_layers(model, cfg.target_layers)
    model = model.to(memory_format=torch.channels_last)  # the layout training evaluated in
    loader = data.make_loader(dataset.test, batch_size=batch_size, train=False)

    with lineage.analysis_run(ref, client) as log:
        log.log_params(
            {
                **cfg.to_params(),
                "env/precision": precision,
                "env/device": device.type,
                "data/test_size": len(dataset.test),
                "data/dataset": dataset_name,
                "eval_batch_size": batch_size,
            }
        )
        log.log_dataset(dataset, dataset.test, "evaluation")
        log.measured_on("test/", dataset, dataset.test)
        pred = predictions.predict(model, loader, device, precision)
        cm = predictions.confusion_matrix(pred.labels, pred.predicted, spec.num_classes)
        stats = predictions.per_class_stats(cm)
        names = list(spec.class_names)
        log.log_metrics(
            {
                "test/accuracy": pred.accuracy,
                "test/loss": pred.loss,
                **{
                    f"test/{stat}/{name}": float(stats[stat][i])
                    for stat in ("accuracy", "precision", "recall")
                    for i, name in enumerate(names)
                },
            }
        )

        wrong = predictions.misclassified(pred)
        log.log_table(
            {
                "index": wrong.tolist(),
                "true": [names[i] for i in pred.labels[wrong]],
                "predicted": [names[i] for i in pred.predicted[wrong]],
                "confidence": pred.confidence[wrong].round(6).tolist(),
            },
            "misclassified.json",
        )
        log.log_figure(plots.confusion_matrix_figure(cm, names), "confusion_matrix.png")
        log.log_figure(
            plots.per_class_accuracy_figure(stats["accuracy"], names, pred.accuracy), "per_class_accuracy.png"
        )
        log.log_text(_confused_pairs_markdown(cm, names, pred.accuracy, len(wrong)), "confused_pairs.md")

        shown = wrong[: cfg.num_images]
        if len(shown):
            images = dataset.test.images[shown]
            true_names = [names[i] for i in pred.labels[shown]]
            pred_names = [names[i] for i in pred.predicted[shown]]
            log.log_figure(
                plots.misclassified_gallery(images, true_names, pred_names, pred.confidence[shown]),
                "misclassified/gallery.png",
            )
            x = hardware.to_device_images(torch.from_numpy(images), torch.device("cpu"))
            for layer_name, layer in layers:
                pred_maps, true_maps = gradcam.gradcam_pairs(
                    model, layer, x, pred.predicted[shown], pred.labels[shown], batch_size=batch_size
                )
                log.log_figure(
                    plots.gradcam_figure(
                        images, pred_maps, true_maps, true_names, pred_names, pred.confidence[shown], layer_name
                    ),
                    f"gradcam/{layer_name}.png",
                )
        notes.analysis_finished(log, ref, dataset_name, pred.accuracy, len(wrong), len(dataset.test))
        print(
            f"\nanalysis of {ref.uri}: test accuracy {pred.accuracy:.4f}, {len(wrong)} misclassified\n"
            f"  view: {runs.run_url(log)}\n"
        )
        return AnalyzeOutcome(log.run_id, pred.accuracy, len(wrong))


def _confused_pairs_markdown(cm: np.ndarray, names: list[str], accuracy: float, wrong: int) -> str:
    lines = [
        "# Most-confused classes\n",
        f"Test accuracy {accuracy:.2%}; {wrong} of {int(cm.sum())} test images misclassified.\n",
        "| true | predicted as | images | share of the true class |",
        "|---|---|---|---|",
    ]
    pairs = predictions.most_confused_pairs(cm, names, CONFUSED_PAIRS)
    lines += [f"| {t} | {p} | {n} | {share:.1%} |" for t, p, n, share in pairs] or ["| (none) | | | |"]
    return "\n".join(lines) + "\n"
