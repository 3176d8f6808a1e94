"""The `pipeline` entry point, as a user runs it (`mlflow run . -e pipeline`): three child runs the first time,
all three reused the second time; and the reuse rule itself on hand-made runs."""

import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifar_mlflow.cli import invoke
from cifar_mlflow.jobs.pipeline import finished_step
from cifar_mlflow.tracking.provenance import code_version
from cifar_mlflow.tracking.runs import open_run
from cifar_mlflow.training import lr_finder
from entrypoints.pipeline import pipeline
from tests.conftest import REPO, cli_args, mlflow_run_cmd, runs_of

PIPELINE = {
    "epochs": 1,
    "batch_size": 32,
    "num_workers": 0,
    "max_train_samples": 128,
    "max_test_samples": 64,
    "width": 16,
    "num_iter": 20,
    "num_images": 4,
    "target_layers": "layer4",
}
STEPS = ("lr_find", "main", "analyze")


def _checkout_copy(folder: Path) -> Path:
    """The project's files (as git sees them, edits included; no tests or benchmarks) copied into `folder`, as a
    user's checkout there would hold them."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if not name.startswith(("tests/", "benchmarks/")) and (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    return folder


def test_pipeline_runs_three_child_steps_then_reuses_them(store, cifar_root, tmp_path, capsys):
    """From a checkout whose path holds a space, with the default data_dir (`data`, resolved against the checkout):
    every step's `mlflow run` logs that path shell-quoted, which once failed the first step."""
    checkout = _checkout_copy(tmp_path / "a checkout" / "cifar-mlflow")
    shutil.copytree(cifar_root, checkout / "data")
    cmd = mlflow_run_cmd(PIPELINE, entry="pipeline")
    cmd[cmd.index(str(REPO))] = str(checkout)
    env = store.env()
    env.pop("PYTHONPATH", None)  # the copy's own package, as a user's checkout would be
    proc = subprocess.run(cmd, cwd=store.root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_of(store)
    (parent,) = [r for r in runs if r.data.tags["mlflow.project.entryPoint"] == "pipeline"]
    children = {r.data.tags["mlflow.project.entryPoint"]: r for r in runs if r is not parent}
    assert sorted(children) == sorted(STEPS) and len(runs) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    for entry, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, entry
        assert run.data.tags["mlflow.runName"] == entry
        assert run.data.tags["code_version"] == parent.data.tags["code_version"] == code_version()
        assert parent.data.tags[f"step/{entry}/run_id"] == run.info.run_id
        assert parent.data.tags[f"step/{entry}/reused"] == "false"

    # data flows through: the range test's suggestion (clamped) is training's LR; analysis gets its version
    suggested = children["lr_find"].data.metrics["lr_find/suggested_lr"]
    lr = lr_finder.clamp_lr(suggested, "sgd")
    assert float(children["main"].data.params["lr"]) == pytest.approx(lr, rel=1e-12)
    assert children["main"].data.params["epochs"] == "1" and children["lr_find"].data.params["num_iter"] == "20"
    for entry, run in children.items():  # the resolved data_dir, as `mlflow run` logged it: shell-quoted
        assert run.data.params["data_dir"] == f"'{checkout / 'data'}'", entry
    assert children["analyze"].data.params["model_uri"] == "models:/cifar10-resnet18/1"
    assert children["analyze"].data.params["target_layers"] == "layer4"
    assert children["analyze"].data.tags["model_version"] == "1"
    assert (
        parent.data.metrics["lr"] == pytest.approx(lr) and parent.data.tags["model_uri"] == "models:/cifar10-resnet18/1"
    )
    assert parent.data.metrics["test/accuracy"] == children["main"].data.metrics["test/accuracy"]
    assert "pipeline finished" in proc.stdout

    # the same call again (this time straight through the click command, in this process, from this checkout with
    # the same code): every step is reused, nothing is trained or registered again
    capsys.readouterr()
    code, message = invoke(pipeline, cli_args({**PIPELINE, "data_dir": checkout / "data"}))
    assert code == 0, message
    runs = runs_of(store)
    assert len(runs) == 5
    (second,) = [
        r for r in runs if r.info.run_id not in {parent.info.run_id} | {c.info.run_id for c in children.values()}
    ]
    assert second.info.status == "FINISHED"
    for entry, run in children.items():
        assert second.data.tags[f"step/{entry}/run_id"] == run.info.run_id
        assert second.data.tags[f"step/{entry}/reused"] == "true"
    assert [str(v.version) for v in MlflowClient(store.uri).search_model_versions("name='cifar10-resnet18'")] == ["1"]
    assert capsys.readouterr().out.count("(reused)") == 3


def test_reuse_needs_same_entry_point_params_code_and_a_finished_run(store):
    client = MlflowClient(store.uri)
    exp = client.get_experiment_by_name(store.experiment).experiment_id

    def make(entry="main", lr="0.1", code=None, status="FINISHED"):
        run = client.create_run(exp, tags={"mlflow.project.entryPoint": entry, "code_version": code or code_version()})
        client.log_param(run.info.run_id, "lr", lr)
        client.log_param(run.info.run_id, "epochs", "2")
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    make(entry="lr_find")
    make(lr="0.2")
    make(code="0123456789abcdef")
    make(status="FAILED")
    with open_run() as parent:

        def find(entry, params, needs):
            return finished_step(parent, entry, params, needs)

        assert find("main", {"lr": 0.1, "epochs": 2}, lambda r: True) is None
        good = make(lr="1e-1")  # `mlflow run` keeps the -P spelling: 1e-1 is the same value as 0.1
        assert find("main", {"lr": 0.1, "epochs": 2}, lambda r: True).info.run_id == good
        assert find("main", {"lr": 0.1, "epochs": 3}, lambda r: True) is None
        assert find("main", {"lr": 0.1, "epochs": 2}, lambda r: False) is None


def test_a_failing_step_fails_the_pipeline_naming_it(store, tmp_path, monkeypatch):
    import os
    import socket
    import sys

    with socket.socket() as s:  # a port nobody listens on: the download fails at once
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("CIFAR_MLFLOW_CIFAR10_URL", f"http://127.0.0.1:{s.getsockname()[1]}/cifar.tar.gz")
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)  # a relative data_dir means this folder, though steps run in the project's
    params = {**PIPELINE, "data_dir": "no-data"}
    code, message = invoke(pipeline, cli_args(params))
    assert code == 1
    assert message.startswith("pipeline step 'lr_find' (run ") and "ended FAILED" in message
    assert "could not download CIFAR-10" in message and str(tmp_path / "no-data" / "cifar-10-batches-py") in message
    runs = {r.data.tags.get("mlflow.project.entryPoint", "pipeline"): r for r in runs_of(store)}
    assert sorted(runs) == ["lr_find", "pipeline"]  # training and analysis never started
    assert runs["pipeline"].info.status == "FAILED" and runs["lr_find"].info.status == "FAILED"
    assert runs["pipeline"].data.tags["failure_reason"].startswith("TrackingError: pipeline step 'lr_find'")
    assert runs["lr_find"].data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id


def test_a_reused_steps_outputs_must_still_be_there(store):
    """Issue 26: a step whose run was deleted, whose artifacts were removed, or whose registered version is gone
    is run again instead of being reused (the analysis would fail on a model that is not there)."""
    import shutil

    import mlflow

    from cifar_mlflow.jobs import pipeline as pipeline_job
    from cifar_mlflow.tracking import steps

    client = MlflowClient(store.uri)
    exp = client.get_experiment_by_name(store.experiment).experiment_id
    with mlflow.start_run(tags={"mlflow.project.entryPoint": "lr_find", "code_version": code_version()}) as run:
        mlflow.log_table({"lr": [0.1], "loss": [1.0], "smoothed_loss": [1.0]}, "lr_find/curve.json")
    kept = client.get_run(run.info.run_id)
    assert pipeline_job._kept(client, kept, pipeline_job.LR_FIND_FILES)
    artifacts = Path(kept.info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifacts / "lr_find")  # removed from the artifact store since
    assert not pipeline_job._kept(client, kept, pipeline_job.LR_FIND_FILES)

    with mlflow.start_run() as trained:
        mlflow.log_dict({"epoch": 1}, "checkpoints/latest.json")
    client.create_registered_model("gone")
    client.create_model_version("gone", f"{trained.info.artifact_uri}/nowhere", run_id=trained.info.run_id)
    client.set_tag(trained.info.run_id, "registered_model_version", "1")
    assert not pipeline_job._registered(client, client.get_run(trained.info.run_id), "gone"), "no MLmodel at the source"
    assert not pipeline_job._registered(client, client.get_run(trained.info.run_id), "other"), "no such version"
    client.delete_run(trained.info.run_id)
    assert trained.info.run_id not in {r.info.run_id for r in steps.finished_runs(client, exp, "main")}
