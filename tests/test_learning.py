"""Does the default recipe learn real images? The `main` entry point's command with nothing but sizes given (its
click command, in the test process, as test_learning_lr_auto.py runs the range test), on the built-in
digits set (real handwritten digits in the CIFAR-10 layout; synthetic data is learnt by any recipe and proves
nothing), at the published width. A recipe that stops learning fails here: the recipe of last month (v0:
zero-init residual branches, a cutout hole kept inside the image) reaches 0.14 at this budget.

The budget is what CI can afford, one compute thread per test process (an AVX2 CPU, fp32): 2 epochs over the
first 640 training images at batch 16, 80 SGD steps, ~90 s with the evaluations. The peak LR is the default,
lr=scaled: 0.2 for batch 512 scaled linearly to 0.00625. The full-length figures (all 1,497 images, 6 epochs,
3 seeds, beside the course-notebook loop) are in benchmarks/RESULTS.md (`python -m benchmarks.bench_accuracy`).
`lr=auto`'s range test on the same data is checked in test_learning_lr_auto.py (its own file, so that xdist runs
the two on both workers at once)."""

import pytest
from mlflow import MlflowClient

from cifar_mlflow import data
from cifar_mlflow.cli import invoke
from entrypoints.train import train
from tests.conftest import cli_args

EPOCHS = 2
# Test accuracy (300 images) after EPOCHS epochs, measured on an AVX2 EPYC (fp32, 1 thread): seed 0 (this test's)
# .29 .84, seed 1 .31 .79; v0, the broken recipe, .15 .14 (benchmarks/RESULTS.md, section 10). 0.75 leaves room for
# the spread between CPUs and precisions (bf16 where the CPU has it) and fails v0 by far. Chance is 0.1.
LEARNS = 0.75
SETTINGS = {
    "dataset": "digits",
    "epochs": EPOCHS,
    "batch_size": 16,
    "max_train_samples": 640,
    "num_workers": 0,
    "seed": 0,
}
SCALED_DEFAULT_LR = 0.2 * 16 / 512


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    data.load_dataset("digits", root)  # built once for the module
    return root


def train_on_digits(store, digits_dir, **params):
    """Run the train entry point's command (in this process: the test process has torch, MLflow and the rest
    imported already); the finished run and its test accuracy by epoch."""
    code, message = invoke(train, cli_args({**SETTINGS, "data_dir": digits_dir, **params}))
    assert code == 0, message
    client = MlflowClient(store.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(store.experiment).experiment_id])
    assert run.info.status == "FINISHED"
    history = [
        m.value for m in sorted(client.get_metric_history(run.info.run_id, "test/accuracy"), key=lambda m: m.step)
    ]
    assert len(history) == EPOCHS
    return run, history


def test_the_default_recipe_learns_real_digits(store, digits_dir):
    run, history = train_on_digits(store, digits_dir)  # the default lr=scaled, nothing scaled by hand
    assert history[-1] >= LEARNS, f"test accuracy per epoch {history}: the default recipe no longer learns"
    assert run.data.params["lr"] == "scaled" and float(run.data.params["lr/resolved"]) == SCALED_DEFAULT_LR
    assert run.data.tags["champion"] == "true" and "champion_withheld" not in run.data.tags
    assert run.data.params["augment"] == "standard" and run.data.params["scheduler"] == "onecycle"
    assert run.data.params["arch"] == "resnet18" and run.data.params["optimizer"] == "sgd"
