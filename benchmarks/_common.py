"""Shared by the benchmarks: machine description, synthetic data, interleaved timing with medians, tables."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def machine() -> str:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {cores} cores, {torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}"


def interleaved(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each contender once per round, round after round (a noisy shared machine hits all of them alike),
    in the given order on even rounds and reversed on odd ones (A B, B A, ...), so that a drift over time or a
    cost that the previous contender leaves behind does not always fall on the same one.
    Each contender returns its own measurement (seconds or a rate)."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            results[name].append(contenders[name]())
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]
    )


def standard_loaders(split, test, batch_size: int, pin_memory: bool = False) -> tuple[object, object, int]:
    """Training loader (the `standard` augmentation, auto worker count, seed 0) and test loader, as a training
    run builds them on the CPU path; and the worker count."""
    from cifar_mlflow import data
    from cifar_mlflow.training import augment

    workers = data.auto_num_workers(-1)
    mean, _ = data.channel_stats(split.images)
    transform = augment.build_train_transform("standard", mean)
    loader = data.make_loader(
        split,
        batch_size=batch_size,
        train=True,
        seed=0,
        num_workers=workers,
        transform=transform,
        pin_memory=pin_memory,
    )
    return loader, data.make_loader(test, batch_size=batch_size, train=False, pin_memory=pin_memory), workers


def add_width_option(parser: argparse.ArgumentParser) -> None:
    """--width: ResNet18's width, the training config's default unless given (the smoke tests build narrow nets)."""
    from cifar_mlflow.values import WIDTH

    parser.add_argument("--width", type=int, default=WIDTH, help=f"ResNet18's width ({WIDTH}: the published network)")


def run_jobs(fn: Callable[[Any], Any], jobs: Iterable[Any], processes: int) -> Iterator[Any]:
    """fn(job) for every job, results as they finish: in `processes` spawned processes at once, or in this process,
    one after the other, with --jobs 1 (no process start and its imports, ~8 s on a 2-core CPU). fn sets torch's
    thread count; this process's is restored after."""
    if processes > 1:
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(fn, job) for job in jobs]):
                yield future.result()
        return
    import torch

    threads = torch.get_num_threads()
    try:
        for job in jobs:
            yield fn(job)
    finally:
        torch.set_num_threads(threads)
