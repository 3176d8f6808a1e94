"""The benchmark scripts run (tiny sizes, CPU) and report what they claim; `--help` stays under a second."""
import statistics
import subprocess
import sys
import time

import pytest

from benchmarks import bench_cuda, bench_train
from tests.conftest import REPO


def test_cuda_benchmark_runs_on_cpu(capsys):
    out = bench_cuda.main(["--images", "64", "--test-images", "32", "--batch-size", "32", "--epochs", "1",
                           "--no-compile"])
    assert out["total_s"] > 0 and 0 <= out["final_accuracy"] <= 1
    assert "total training time" in capsys.readouterr().out


def test_train_benchmark_reports_every_ratio(capsys):
    ratios = bench_train.main(["--images", "32", "--batch-size", "16", "--repeats", "1"])
    assert set(ratios) == {"engine / notebook (target >= 2.0)", "engine / training limit (target >= 0.9)",
                           "evaluation / inference limit (target >= 0.9)", "loader / engine training (target >= 10)"}
    assert all(v > 0 for v in ratios.values())
    assert "notebook-style loop" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["entrypoints.train", "entrypoints.analyze", "entrypoints.lr_find"])
def test_help_answers_in_under_a_second(module):
    def once():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, check=True, capture_output=True)
        return time.perf_counter() - start
    assert statistics.median(once() for _ in range(3)) < 1.0
