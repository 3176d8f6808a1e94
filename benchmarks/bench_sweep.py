"""What pruning saves on a real sweep (issue 17): the `sweep` entry point on real images (the digits set), as a
user runs it, then the parent run's summary read back: trials, how many were pruned, epochs run against epochs
asked, and the best trial's accuracy against the base recipe's (trial 0 is the defaults).

    python -m benchmarks.bench_sweep [--trials 8] [--epochs 3] [--images 640] [--batch-size 16] [--lr 0.00625] [--width 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import add_width_option, machine

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=640, help="training images (0 = all 1,497)")
    parser.add_argument("--test-images", type=int, default=0, help="test images (0 = all 300)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", default="0.00625", help="base peak LR (0.2 at 512 scaled to the batch size)")
    parser.add_argument("--pruner", default="median")
    parser.add_argument("--prune-after-trials", type=int, default=2)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--store", help="folder for the sqlite store (default: a new temp folder)")
    add_width_option(parser)
    args = parser.parse_args(argv)
    store = Path(args.store or tempfile.mkdtemp(prefix="bench-sweep-")).resolve()
    store.mkdir(parents=True, exist_ok=True)
    params = {
        "n_trials": args.trials,
        "epochs": args.epochs,
        "dataset": args.dataset,
        "data_dir": store / "data",
        "max_train_samples": args.images,
        "max_test_samples": args.test_images,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "pruner": args.pruner,
        "prune_after_trials": args.prune_after_trials,
        "num_workers": 0,
        "width": args.width,
        "registered_model_name": "bench-sweep",
    }
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "PYTHONPATH": str(ROOT),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):  # the store's default experiment
        env.pop(name, None)
    cmd = [sys.executable, "-m", "entrypoints.sweep", *[x for k, v in params.items() for x in (f"--{k}", str(v))]]
    start = time.time()
    subprocess.run(cmd, cwd=store, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - start

    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (parent,) = client.search_runs(["0"], "tags.`sweep/role` = 'parent'")
    m = parent.data.metrics
    path = client.download_artifacts(parent.info.run_id, "sweep/trials.json", str(store))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    names = [c for c in table["columns"] if c not in ("trial", "state", "value", "epochs_run", "retry_of", "run_id")]
    print(f"machine: {machine()}; wall {wall:.0f} s")
    print(f"`python -m benchmarks.bench_sweep {' '.join(argv or sys.argv[1:])}`\n")
    print("| trial | state | epochs run | " + " | ".join(names) + " | test accuracy |")
    print("|---" * (4 + len(names)) + "|")
    for r in rows:
        values = [f"{r[n]:.3g}" if isinstance(r[n], float) else str(r[n]) for n in names]
        value = f"{r['value']:.3f}" if r["value"] is not None else "-"
        print(f"| {r['trial']} | {r['state']} | {r['epochs_run']} | " + " | ".join(values) + f" | {value} |")
    summary = {
        "trials": m["sweep/trials_complete"] + m["sweep/trials_pruned"],
        "pruned": m["sweep/trials_pruned"],
        "epochs_run": m["sweep/epochs_run"],
        "epochs_asked": m["sweep/epochs_asked"],
        "best": m.get("best/test/accuracy", float("nan")),
        "base": m.get("base/test/accuracy", float("nan")),
        "wall_s": wall,
    }
    print(
        f"\n{summary['trials']:.0f} trials, {summary['pruned']:.0f} pruned; {summary['epochs_run']:.0f} of "
        f"{summary['epochs_asked']:.0f} epochs run ({1 - summary['epochs_run'] / summary['epochs_asked']:.0%} saved); "
        f"best test accuracy {summary['best']:.3f} (trial {parent.data.tags.get('best/trial')}) vs the base "
        f"recipe's {summary['base']:.3f}"
    )
    return summary


if __name__ == "__main__":
    main()
