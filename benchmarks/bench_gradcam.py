"""Target 5 of the speed issue: GradCAM for 25 images batched (one call per layer) against one call per image,
with identical maps (tolerance 1e-5); and the analysis entry point on 2,000 test images with 25 images x 2 layers
of GradCAM: wall time, and where it goes.

    python -m benchmarks.bench_gradcam [--images 25] [--test-images 2000] [--analysis-images 25] [--repeats 3]
                                       [--width 64]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from collections import defaultdict

import mlflow
import numpy as np
import torch

import benchmarks._common as common  # noqa: F401  (sets the environment first)
from benchmarks._common import add_width_option, interleaved, machine, median, table
from cifar_mlflow import data, models
from cifar_mlflow.analysis import gradcam, predictions
from cifar_mlflow.config import AnalyzeConfig, TrainConfig
from cifar_mlflow.jobs import analyze as analyze_job
from cifar_mlflow.tracking import lineage, registry, runs, serving
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.training import engine, hardware


def per_image(model, layer, x, classes, batch: int = 1) -> np.ndarray:
    """The notebook way: one GradCAM object, one call per image (batch=1), full backward through the network.
    batch=len(x): the same in one call, to separate what batching and what the project's shorter backward give."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[layer]) as cam:
        return np.concatenate(
            [
                cam(
                    input_tensor=x[i : i + batch],
                    targets=[ClassifierOutputTarget(int(c)) for c in classes[i : i + batch]],
                )
                for i in range(0, len(x), batch)
            ]
        )


def _trained_model(uri: str, width: int) -> str:
    """A quickly trained, registered model in a fresh store (GradCAM of an untrained net is not representative)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench")
    split, test = data.make_synthetic(256, seed=1), data.make_synthetic(64, seed=2)
    mean, std = data.channel_stats(split.images)
    spec = models.ModelSpec("resnet18", data.SYNTHETIC_CLASSES, mean, std, width=width)
    torch.manual_seed(0)
    model = models.build_model(spec).to(memory_format=torch.channels_last)
    cfg = TrainConfig(epochs=2, batch_size=64, dataset="synthetic", width=width)
    cpu = hardware.resolve_device()
    with runs.open_run() as log:
        log.log_params({**cfg.to_params(), "env/precision": hardware.resolve_precision("auto", cpu)})
        result = engine.fit(
            model,
            data.make_loader(split, batch_size=64, train=True),
            data.make_loader(test, batch_size=64, train=False),
            cfg,
            cpu,
            hardware.resolve_precision("auto", cpu),
            log=lambda s: None,
        )
        example = (test.images[:2].transpose(0, 3, 1, 2) / 255.0).astype("float32")
        return registry.log_and_register_model(
            log, model, spec, example, "bench-gradcam", result.history[-1]["test/accuracy"], 2, test_size=len(test)
        ).model_uri


def _profile_analysis(model_uri: str, test_images: int, shown: int) -> tuple[float, dict[str, float]]:
    """Run the real analysis job, timing the stages it calls (by wrapping them where the job looks them up)."""
    spent: dict[str, float] = defaultdict(float)
    stages = {
        (data, "load_dataset"): "read/generate test data",
        (lineage, "resolve_model"): "registry lookups",
        (serving, "load_torch_model"): "download + load model",
        (predictions, "predict"): "evaluate test set",
        (gradcam, "gradcam_pairs"): f"GradCAM (2 layers x {shown} images x 2 classes)",
        (RunLogger, "log_figure"): "render + log figures",
        (RunLogger, "log_table"): "log table",
        (RunLogger, "log_dataset"): "log dataset input",
        (RunLogger, "log_metrics"): "log metrics",
    }
    originals = {}
    for (module, name), label in stages.items():
        fn = getattr(module, name)
        originals[(module, name)] = fn

        @functools.wraps(fn)
        def wrapper(*a, _fn=fn, _label=label, **k):
            start = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] += time.perf_counter() - start

        setattr(module, name, wrapper)
    try:
        start = time.perf_counter()
        analyze_job.run_analysis(
            AnalyzeConfig(model_uri=model_uri, dataset="synthetic", max_test_samples=test_images, num_images=shown)
        )
        total = time.perf_counter() - start
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
    return total, dict(spent)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=25)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--analysis-images", type=int, default=25, help="the analysis's num_images")
    parser.add_argument("--repeats", type=int, default=3)
    add_width_option(parser)
    args = parser.parse_args(argv)

    previous, tmp = os.getcwd(), tempfile.mkdtemp(prefix="bench-gradcam-")
    os.chdir(tmp)  # the sqlite store's artifacts go to ./mlruns: keep them out of the checkout
    try:
        return _measure(args, _trained_model(f"sqlite:///{tmp}/mlflow.db", args.width))
    finally:
        os.chdir(previous)
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(args: argparse.Namespace, model_uri: str) -> dict[str, float]:
    model, _ = serving.load_torch_model(model_uri)
    images = data.make_synthetic(args.images, seed=7).images
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    classes = models.predict_proba(model, x).argmax(1).tolist()

    rows, diffs = [], {}
    for layer_name in ("layer3", "layer4"):
        layer = dict(model.named_modules())[layer_name]
        maps = {}

        def project(_layer=layer, maps=maps) -> float:
            start = time.perf_counter()
            maps["project"] = gradcam.gradcam_maps(model, _layer, x, classes, batch_size=len(x))
            return time.perf_counter() - start

        def batched_full(_layer=layer, maps=maps) -> float:
            start = time.perf_counter()
            maps["batched"] = per_image(model, _layer, x, classes, batch=len(x))
            return time.perf_counter() - start

        def single(_layer=layer, maps=maps) -> float:
            start = time.perf_counter()
            maps["per image"] = per_image(model, _layer, x, classes)
            return time.perf_counter() - start

        names = {"one call per image": single, "one call, full backward": batched_full, "project": project}
        interleaved(names, 1)  # warm-up
        res = {k: median(v) for k, v in interleaved(names, args.repeats).items()}
        diffs[layer_name] = max(float(np.abs(maps[k] - maps["per image"]).max()) for k in ("project", "batched"))
        rows.append(
            [
                layer_name,
                res["one call per image"],
                res["one call, full backward"],
                res["project"],
                res["one call per image"] / res["project"],
                diffs[layer_name],
            ]
        )
    print(f"machine: {machine()}\n")
    print(f"GradCAM, {args.images} images, median of {args.repeats} interleaved runs")
    print(
        table(
            [
                "layer",
                "per image s",
                "one call, full backward s",
                "project: one call, backward to the layer s",
                "speed-up project / per image (target >= 2)",
                "max |diff| (<= 1e-5)",
            ],
            rows,
        )
    )

    total, spent = _profile_analysis(model_uri, args.test_images, args.analysis_images)
    other = total - sum(spent.values())
    print(
        f"\nanalysis entry point, {args.test_images} test images, {args.analysis_images} images x 2 layers: "
        f"{total:.1f} s wall"
    )
    print(
        table(
            ["stage", "seconds", "share"],
            [[k, v, f"{v / total:.0%}"] for k, v in sorted(spent.items(), key=lambda kv: -kv[1])]
            + [["run set-up, params, tags, the rest", other, f"{other / total:.0%}"]],
        )
    )
    return {"speedup_layer4": rows[1][4], "max_diff": max(diffs.values()), "analysis_s": total}


if __name__ == "__main__":
    main()
