"""The benchmark scripts run (tiny sizes, CPU) and report what they claim; `--help` stays under a second."""

import json
import os
import re
import subprocess
import sys

import mlflow
import pytest

from benchmarks import (
    bench_accuracy,
    bench_batch_lr,
    bench_cuda,
    bench_figures,
    bench_gradcam,
    bench_startup,
    bench_sweep,
    bench_train,
)
from cifar_mlflow.params_doc import ENTRY_POINTS
from tests.conftest import REPO


def test_cuda_benchmark_runs_on_cpu(capsys):
    out = bench_cuda.main(
        ["--images", "64", "--test-images", "32", "--batch-size", "32", "--epochs", "1", "--no-compile"]
    )
    assert out["total_s"] > 0 and 0 <= out["final_accuracy"] <= 1
    assert "total training time" in capsys.readouterr().out


def test_accuracy_benchmark_runs_both_contenders_and_the_ablation(tmp_path, capsys):
    """Tiny sizes: this shows the script runs both sides on the same real files and reports them; what they
    learn at full size is in RESULTS.md (tests/test_learning.py checks the recipe learns)."""
    tiny = [
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--max-train",
        "64",
        "--max-test",
        "32",
        "--batch-size",
        "32",
        "--jobs",
        "1",
        "--width",
        "16",
        "--data-dir",
        str(tmp_path),
        "--json",
        str(tmp_path / "acc.json"),
    ]
    out = bench_accuracy.main(tiny)
    assert set(out) == {"notebook-style loop", "project (defaults)"}
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in out.values())
    assert json.loads((tmp_path / "acc.json").read_text()).keys() == out.keys()
    printed = capsys.readouterr().out
    assert "digits, 1 epochs, batch 32, peak lr 0.05, seeds [0]" in printed and "median by epoch" in printed
    ablation = bench_accuracy.main([*tiny[:-2], "--ablation", "--variants", "0", "6"])
    assert set(ablation) == {bench_accuracy.ABLATION[0].name, bench_accuracy.ABLATION[6].name}


def test_batch_lr_benchmark_trains_the_defaults_at_each_batch_size(tmp_path, capsys):
    finals = bench_batch_lr.main(
        ["--batch-sizes", "16", "32", "--seeds", "0", "--epochs", "1", "--max-train", "64", "--max-test", "32"]
        + ["--jobs", "1", "--width", "16", "--data-dir", str(tmp_path)]
    )
    assert set(finals) == {16, 32} and all(0 <= a <= 1 for accs in finals.values() for a in accs)
    out = capsys.readouterr().out
    assert re.search(r"\|\s*16\s*\|\s*0\.00625\s*\|", out) and re.search(r"\|\s*32\s*\|\s*0\.0125\s*\|", out)


def test_train_benchmark_reports_every_ratio(capsys):
    ratios = bench_train.main(["--images", "32", "--batch-size", "16", "--repeats", "1", "--width", "16"])
    assert set(ratios) == {
        "engine / notebook (target >= 2.0)",
        "engine / training limit (target >= 0.9)",
        "evaluation / inference limit (target >= 0.9)",
        "loader / engine training (target >= 10)",
    }
    assert all(v > 0 for v in ratios.values())
    assert "notebook-style loop" in capsys.readouterr().out


def test_figures_benchmark_draws_every_figure_and_the_grids_faster_than_an_axes_per_image(capsys):
    res = bench_figures.main(["--repeats", "1"])
    grids = [k.split("|")[0] for k in res if k.endswith("|axes")]
    assert len(grids) == 3 and all(res[f"{g}|axes"] > 1.5 * res[f"{g}|project"] for g in grids), res
    assert len([k for k in res if k.endswith("|project")]) == 8 and all(v > 0 for v in res.values())
    assert "| augmented samples (32 images) " in capsys.readouterr().out


def _bench(module: str, *args: str, cwd) -> str:
    """Run a benchmark as users do (python -m, from any folder); it must exit 0. Its output."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_tracking_benchmark_measures_what_a_training_run_logs(tmp_path):
    """The tracked contender does everything a training run does each epoch: metrics, checkpoint, GradCAM panel."""
    out = _bench(
        "bench_tracking",
        "--images",
        "64",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--repeats",
        "1",
        "--store",
        str(tmp_path),
        "--width",
        "16",
        cwd=tmp_path,
    )
    assert re.search(r"\| ratio on/off \(target <= 1.02\) +\| \d+\.\d+", out), out
    assert "GradCAM panel after epochs [1, 2]" in out
    cpu = re.search(r"\| reporting thread CPU \(checkpoints, metrics, panels\) +\| ([\d.]+)", out)
    assert cpu and float(cpu.group(1)) > 0, out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy")] == [1, 2]
    manifest = json.loads(
        open(client.download_artifacts(run.info.run_id, "checkpoints/latest.json", str(tmp_path))).read()
    )
    assert manifest["epoch"] == 2 and manifest["path"] == "checkpoints/slot-b/checkpoint.pt"
    panels = sorted(
        a.path.split("+")[2]
        for a in client.list_artifacts(run.info.run_id, "images")
        if a.path.startswith("images/gradcam_panel") and a.path.endswith(".png")
    )
    assert panels == ["1", "2"]
    assert run.info.artifact_uri.startswith(tmp_path.as_uri()) or run.info.artifact_uri.startswith(str(tmp_path))


@pytest.fixture
def mlflow_state_kept(monkeypatch, tmp_path):
    """For a benchmark's main() in this process: the tracking URI, experiment, environment and working folder it
    sets are this test's only (as a process of its own would have them)."""
    import mlflow.tracking.fluent

    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(key, "")  # remembers the value before (or that there was none) for the teardown
        monkeypatch.delenv(key)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # mlflow.set_experiment's
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_gradcam_benchmark_batched_maps_equal_per_image_maps(mlflow_state_kept, capsys):
    """In this process (bench_tracking's test runs a benchmark as users do, `python -m` from another folder)."""
    # width 32 (8e-7 measured): at width 16 this briefly trained net's layer3 maps differed by 4e-3 between the
    # batched and the per-image backward in one run (GradCAM scales each map to [0, 1], which magnifies float noise
    # in a map that is nearly flat)
    bench_gradcam.main(
        ["--images", "4", "--test-images", "64", "--analysis-images", "4", "--repeats", "1", "--width", "32"]
    )
    out = capsys.readouterr().out
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith(("| layer3 ", "| layer4 "))
    ]
    assert [r[0] for r in rows] == ["layer3", "layer4"], out
    assert all(float(r[-1]) <= 1e-5 and float(r[-2]) > 0 for r in rows), rows  # max |diff|, speed-up
    assert "analysis entry point, 64 test images" in out and "evaluate test set" in out


def test_startup_benchmark_reports_help_and_first_step(capsys):
    """The one timing of every entry point's `--help` (three runs each; what they import: tests/test_e2e.py): the
    median answers in under a second. (In this process: what it times are processes of their own.)"""
    bench_startup.main(["--repeats", "3", "--import-repeats", "1", "--width", "16"])
    out = capsys.readouterr().out
    for _, module in ENTRY_POINTS.values():
        row = re.search(rf"\| {re.escape(module)} --help \(target < 1 s\) +\| ([\d.]+) ", out)
        assert row and float(row.group(1)) < 1.0, out
    first = re.search(r"process start -> first training step \(synthetic data\) +\| ([\d.]+)", out)
    assert first and 0 < float(first.group(1)) < 120, out
    for gc_state in ("running", "paused"):
        cpu = re.search(rf"\| heavy imports, CPU-s, garbage collector {gc_state} +\| ([\d.]+) ", out)
        assert cpu and float(cpu.group(1)) > 0, out


def test_sweep_benchmark_reports_trials_epochs_and_best_against_base(tmp_path, capsys):
    """In this process: the sweep it times is a process of its own."""
    bench_sweep.main(
        [
            *("--dataset", "synthetic", "--trials", "2", "--epochs", "1", "--images", "64", "--test-images", "32"),
            *("--store", str(tmp_path / "store"), "--width", "16"),
        ]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 and rows[0].split(" | ")[1] == "COMPLETE", out
    assert "2 trials, 0 pruned; 2 of 2 epochs run (0% saved); best test accuracy" in out
