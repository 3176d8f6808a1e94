"""Data-parallel training with torchrun on 2 CPU processes (gloo), through `mlflow run -e ddp` as documented: one
run, killed after epoch 1 and resumed, ends FINISHED with one registered version, metrics that are the reduction
of the per-process values and disjoint shards; the sharded sampler itself; a batch that does not split."""

import contextlib
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch
from mlflow import MlflowClient

from cifar_mlflow import data
from cifar_mlflow.tracking.serving import load_torch_model
from cifar_mlflow.training import engine
from tests.conftest import TINY, mlflow_run_cmd, runs_of

DDP = {**TINY, "nproc_per_node": 2, "max_test_samples": 100}


def _mlflow_run_ddp(store, params, run_id=None):
    return subprocess.Popen(
        mlflow_run_cmd(params, entry="ddp", run_id=run_id),
        cwd=store.root,
        env=store.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (11, 3), (7, 4)])
def test_sharded_sampler_splits_each_epoch_without_overlap(n, world):
    for shuffle in (True, False):
        shards = []
        for rank in range(world):
            sampler = data.EpochSampler(n, seed=3, shuffle=shuffle, rank=rank, world=world)
            sampler.set_epoch(2)
            keys = list(sampler)
            assert len(keys) == len(sampler)
            shards.append({k - 2 * n for k in keys})
        union = set().union(*shards)
        assert sum(map(len, shards)) == len(union), "shards overlap"
        if shuffle:  # training: equal shards (same number of steps everywhere), at most world-1 left out
            assert len({len(s) for s in shards}) == 1 and n - len(union) == n % world
        else:  # evaluation: every sample exactly once
            assert union == set(range(n))


def test_torchrun_run_killed_resumes_then_holds_reduced_metrics_disjoint_shards_one_version(store, cifar_root):
    """One data-parallel run through `mlflow run -e ddp`, killed whole after epoch 1 (a crash) and resumed with
    `--run-id`: it ends FINISHED with every epoch once, one version registered by rank 0, metrics that reduce the
    processes' own, and the disjoint shards each process drew in epoch 1."""
    params = {**DDP, "epochs": 3, "data_dir": cifar_root}
    proc = _mlflow_run_ddp(store, params)
    client = MlflowClient(store.uri)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for epoch 1's checkpoint + metrics, then kill everything
        runs = runs_of(store)
        if runs and client.get_metric_history(runs[0].info.run_id, "test/accuracy"):
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    else:
        pytest.fail("no epoch finished within 300 s")
    # a crash of the whole job: torchrun starts its workers in sessions of their own, so kill every descendant
    doomed = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    (run,) = runs_of(store)
    run_id = run.info.run_id
    client.set_terminated(run_id, "FAILED")  # what a dead process leaves: the run is not FINISHED

    again = _mlflow_run_ddp(store, params, run_id)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-4000:]
    assert "resuming run" in out, out[-6000:]
    run = client.get_run(run_id)
    m, p = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED" and int(run.data.tags["resumed_from_epoch"]) >= 1
    assert (p["env/world_size"], p["env/backend"], p["env/per_process_batch_size"]) == ("2", "gloo", "8")

    # one version, registered by rank 0 only
    versions = client.search_model_versions("name='cifar10-resnet18'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == run_id
    assert "training finished" in out and out.count("registered models:/cifar10-resnet18/1") == 1

    # every epoch logged once; train metrics are the sample-weighted reduction of the per-process values
    for key in ("train/loss", "train/accuracy", "test/accuracy", "ranks/0/train/loss", "ranks/1/train/loss"):
        assert sorted(x.step for x in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    n0, n1 = m["ranks/0/train/samples"], m["ranks/1/train/samples"]
    assert n0 == n1 == 128
    for key in ("train/loss", "train/accuracy"):
        r0, r1 = m[f"ranks/0/{key}"], m[f"ranks/1/{key}"]
        assert m[key] == pytest.approx((r0 * n0 + r1 * n1) / (n0 + n1), rel=1e-12)
        assert r0 != r1  # two different shards

    # the shards each process drew in epoch 1 are disjoint and together cover the training set
    shards = json.loads(open(client.download_artifacts(run_id, "distributed/shards.json", str(store.root))).read())
    a, b = map(set, shards["epoch1_indices_by_rank"])
    assert shards["world_size"] == 2 and len(a) == len(b) == 128 and not a & b and a | b == set(range(256))

    # test metrics (summed over both shards of the 100 test images) = the registered model on all 100 images
    net, _ = load_torch_model("models:/cifar10-resnet18/1")
    test = data.read_cifar10(cifar_root, max_test=100).test
    loader = data.make_loader(test, batch_size=32, train=False)
    got = engine.evaluate(net.to(memory_format=torch.channels_last), loader, torch.device("cpu"), p["env/precision"])
    assert got["test/accuracy"] == pytest.approx(m["test/accuracy"], abs=1 / 100)
    # relative: after few steps the eval-mode BN statistics are far from settled and the loss can be large,
    # where float32 sums in another order differ in the 7th digit
    assert got["test/loss"] == pytest.approx(m["test/loss"], rel=1e-5, abs=1e-3)


def test_batch_that_does_not_split_over_the_processes_is_refused_first(store, tmp_path, monkeypatch):
    from cifar_mlflow.cli import invoke
    from entrypoints.train import train

    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 sets it
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, message = invoke(train, ["--dataset", "synthetic", "--batch_size", "64"])
    assert code == 1
    assert message == (
        "batch_size=64 is not allowed with 3 processes: expected a multiple of 3 (each process "
        "takes batch_size/3 images per step)"
    )
    assert runs_of(store) == [] and list(work.iterdir()) == []
