"""The defaults at several batch sizes (issue 26): the project's own training path with lr=scaled (0.2 x batch /
512) on real images (the built-in digits set by default), test accuracy after each epoch, median of the seeds.

    python -m benchmarks.bench_batch_lr                      # batches 32 64 128 512, seeds 0 1 2, 6 epochs
    python -m benchmarks.bench_batch_lr --batch-sizes 64 --seeds 0 --epochs 2 --max-train 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks._common import add_width_option, machine, run_jobs, table


def _one(job: tuple[int, int, argparse.Namespace]) -> tuple[int, int, list[float], float]:
    batch, seed, args = job
    import torch

    from benchmarks.bench_accuracy import Variant, project_run

    torch.set_num_threads(args.threads)
    run_args = argparse.Namespace(**{**vars(args), "batch_size": batch, "lr": "scaled"})
    start = time.perf_counter()
    return batch, seed, project_run(Variant("project"), seed, run_args), time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[int, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 512])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--data-dir", default=None, help="default: a temporary folder (digits is built there)")
    parser.add_argument("--max-train", type=int, default=0, help="first N training images (0 = all)")
    parser.add_argument("--max-test", type=int, default=0, help="first N test images (0 = all)")
    parser.add_argument(
        "--jobs", type=int, default=len(os.sched_getaffinity(0)), help="processes at once (1: in this process)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    add_width_option(parser)
    args = parser.parse_args(argv)
    from cifar_mlflow import data
    from cifar_mlflow.config import scaled_lr

    with tempfile.TemporaryDirectory() as tmp:
        args.data_dir = args.data_dir or tmp
        data.load_dataset(args.dataset, args.data_dir)  # built once, before the jobs start
        jobs = [(batch, seed, args) for batch in args.batch_sizes for seed in args.seeds]
        done: dict[int, dict[int, list[float]]] = {}
        for batch, seed, acc, secs in run_jobs(_one, jobs, args.jobs):
            done.setdefault(batch, {})[seed] = acc
            print(f"batch {batch}, seed {seed}: {' '.join(f'{a:.3f}' for a in acc)} ({secs:.0f} s)", flush=True)
    rows = []
    for batch in args.batch_sizes:
        finals = [done[batch][s][-1] for s in args.seeds]
        rows.append(
            [
                batch,
                f"{scaled_lr(batch):.4g}",
                f"{statistics.median(finals):.3f}",
                ", ".join(f"{a:.3f}" for a in finals),
                " ".join(f"{statistics.median(e):.2f}" for e in zip(*done[batch].values())),
            ]
        )
    print(f"machine: {machine()}")
    print(table(["batch", "lr=scaled", "test acc, last epoch (median)", "per seed", "median by epoch"], rows))
    return {batch: [done[batch][s][-1] for s in args.seeds] for batch in args.batch_sizes}


if __name__ == "__main__":
    main()
