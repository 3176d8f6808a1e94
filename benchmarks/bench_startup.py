"""Target 6 of the speed issue: `python -m entrypoints.train --help` answers in under 1 s (heavy imports happen
only when work starts), and the time from process start to the end of the first training step, as a real run
logs it (`perf/seconds_to_first_step`). And the CPU time of an entry point's heavy imports (torch, torchvision,
MLflow, albumentations, matplotlib) in a fresh process, with Python's garbage collector running and paused
(cli.heavy_imports, what the entry points do), side by side.

    python -m benchmarks.bench_startup [--repeats 5] [--import-repeats 5] [--width 64]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchmarks._common as common  # noqa: F401  (sets the environment first)
from benchmarks._common import add_width_option, interleaved, machine, median, table
from cifar_mlflow.params_doc import ENTRY_POINTS

REPO = Path(__file__).resolve().parents[1]


def help_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


HEAVY = "import torch, torchvision, mlflow, mlflow.pytorch, albumentations, matplotlib.figure"


def import_cpu_seconds(gc_paused: bool) -> float:
    """CPU seconds (user + system) of a fresh Python process that imports HEAVY, inside cli.heavy_imports or not."""
    code = f"from cifar_mlflow.cli import heavy_imports\nwith heavy_imports():\n    {HEAVY}" if gc_paused else HEAVY
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def first_step_seconds(store: Path, width: int) -> float:
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    tiny = "--dataset synthetic --epochs 1 --max_train_samples 64 --max_test_samples 32 --batch_size 32 --num_workers 0"
    tiny += " --log_images_every 0"  # what follows the first step is not measured
    subprocess.run(
        [sys.executable, "-m", "entrypoints.train", *tiny.split(), "--width", str(width)],
        cwd=store,
        env=env,
        check=True,
        capture_output=True,
    )
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.search_runs(["0"], order_by=["start_time DESC"], max_results=1)[0]
    return run.data.metrics["perf/seconds_to_first_step"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--import-repeats", type=int, default=5, help="rounds of the two import contenders")
    add_width_option(parser)
    args = parser.parse_args(argv)
    rows = []
    out = {}
    for _, module in ENTRY_POINTS.values():
        runs = [help_seconds(module) for _ in range(args.repeats)]
        out[module] = median(runs)
        rows.append([f"{module} --help (target < 1 s)", median(runs), ", ".join(f"{r:.2f}" for r in runs)])
    with tempfile.TemporaryDirectory() as tmp:
        runs = [first_step_seconds(Path(tmp), args.width) for _ in range(max(1, args.repeats // 2))]
    out["first_step"] = median(runs)
    rows.append(
        ["process start -> first training step (synthetic data)", median(runs), ", ".join(f"{r:.2f}" for r in runs)]
    )
    imports = interleaved(
        {"running": lambda: import_cpu_seconds(False), "paused": lambda: import_cpu_seconds(True)}, args.import_repeats
    )
    for name, cpu in imports.items():
        out[f"imports_cpu_gc_{name}"] = median(cpu)
        rows.append(
            [f"heavy imports, CPU-s, garbage collector {name}", median(cpu), ", ".join(f"{r:.2f}" for r in cpu)]
        )
    print(f"machine: {machine()}\n")
    print(table(["measure", "seconds (median)", "runs"], rows))
    return out


if __name__ == "__main__":
    main()
