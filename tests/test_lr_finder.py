"""LR range test: the pure suggestion rule, on a recorded real curve beside two widely used finders' rules, a
sensible LR on a task with a known good range, exact state restoration, early stop on divergence."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cifar_mlflow import data
from cifar_mlflow.errors import ConfigError
from cifar_mlflow.training import lr_finder

CPU = torch.device("cpu")


def test_suggest_lr_is_the_steepest_descent_before_the_minimum():
    lrs = np.logspace(-5, 1, 121)
    x = np.log10(lrs)
    loss = 2.3 - 1.5 / (1 + np.exp(-4 * (x + 2))) + np.exp(3 * (x - 0.5))  # falls fastest at 1e-2, blows up
    suggested = lr_finder.suggest_lr(lrs, loss)
    assert 0.01 / 1.3 < suggested < 0.01 * 1.3
    # a steeper fall beyond the minimum (the divergence side) is never chosen
    assert suggested < lrs[np.argmin(loss)]


def test_suggest_lr_needs_enough_points():
    with pytest.raises(ValueError, match="need at least 8 points"):
        lr_finder.suggest_lr([1e-3, 1e-2, 1e-1], [2.0, 1.0, 3.0])


# ------------------------------------------------------------------------------ a recorded real curve
CURVE = json.loads((Path(__file__).parent / "data" / "lr_curve_digits_b64.json").read_text())


def _ema(losses, beta, bias_correct):
    avg, out = 0.0, []
    for i, v in enumerate(losses):
        if bias_correct:
            avg = beta * avg + (1 - beta) * v
            out.append(avg / (1 - beta ** (i + 1)))
        else:
            avg = v if i == 0 else beta * avg + (1 - beta) * v
            out.append(avg)
    return np.asarray(out)


def torch_lr_finder_rule(lrs, losses, skip_start=10, skip_end=5):
    """davidtvs/pytorch-lr-finder, as documented: losses smoothed by an EMA (smooth_f=0.05) started at the first
    loss; `plot(suggest_lr=True)` takes the steepest np.gradient of the smoothed losses, first 10 and last 5
    points skipped."""
    smoothed = _ema(losses, 0.95, bias_correct=False)[skip_start:-skip_end]
    return float(np.asarray(lrs)[skip_start:-skip_end][np.argmin(np.gradient(smoothed))])


def fastai_valley_rule(lrs, losses):
    """fastai's `lr_find(suggest_funcs=valley)`, as documented: losses smoothed by a bias-corrected EMA (beta
    0.98), the first tenth and last 5 points dropped; the longest decreasing subsequence of the rest; the
    suggestion sits half-way into its second third."""
    n_it = len(lrs)
    lrs, smoothed = np.asarray(lrs)[n_it // 10 : -5], _ema(losses, 0.98, bias_correct=True)[n_it // 10 : -5]
    lds, start, end = [1] * len(smoothed), 0, 0
    for i in range(1, len(smoothed)):
        for j in range(i):
            if smoothed[i] < smoothed[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[end] < lds[i]:
                end, start = i, i - lds[i]
    third = (end - start) / 3
    return float(lrs[start + int(third) + int(third / 2)])


def previous_rule(lrs, losses, skip_start=3):
    """The project's rule before the fix: bias-corrected EMA (0.05), np.gradient against log10(lr) from the 4th
    point up to the EMA's minimum."""
    smoothed = _ema(losses, 0.95, bias_correct=True)
    stop = max(int(np.argmin(smoothed)) + 1, skip_start + 3)
    slope = np.gradient(smoothed[skip_start:stop], np.log10(lrs)[skip_start:stop])
    return float(lrs[skip_start + int(np.argmin(slope))])


def test_on_a_recorded_real_curve_the_suggestion_is_where_sgd_learns_unlike_two_common_rules():
    """The digits sweep at batch 64 (tests/data): the loss falls slowly for three decades, fastest near 1e-2,
    bottoms out at 1.4-1.9e-2, jumps to 8 around 0.1-0.2 and settles back at chance level (2.3) for the largest LRs.
    SGD trains this set to >= 0.95 at peak LR 0.05 (benchmarks/RESULTS.md)."""
    lrs, losses = CURVE["lrs"], CURVE["losses"]
    level, slope = lr_finder.centred_fit(lrs, losses)
    lr_at_min = lrs[int(np.nanargmin(level))]
    assert 0.01 < lr_at_min < 0.03
    ours = lr_finder.suggest_lr(lrs, losses)
    assert 0.005 <= ours <= lr_at_min and ours == pytest.approx(0.0142, rel=0.01)
    # robust to a coarser sweep (every second point: 50 steps, as `lr=auto` takes on a small set)
    for offset in (0, 1):
        assert 0.005 <= lr_finder.suggest_lr(lrs[offset::2], losses[offset::2]) <= lr_at_min
    # torch-lr-finder's steepest EMA gradient picks the loss falling back from 8 to chance level, 30x past the
    # minimum, where SGD does not train at all: searching only below the minimum is what our rule adds
    assert torch_lr_finder_rule(lrs, losses) > 10 * lr_at_min
    # fastai's valley is a decade more cautious (1.1e-3: inside the long slow fall); ours is at the steep part
    valley = fastai_valley_rule(lrs, losses)
    assert valley == pytest.approx(1.15e-3, rel=0.01) and ours > 10 * valley
    # the previous rule happens to be right on this curve (recorded with the network's current init); with the
    # earlier init it suggested 1.52e-5, which is exactly its first allowed point, lrs[3]: noise read as descent
    assert previous_rule(lrs, losses) == pytest.approx(ours, rel=0.25)
    assert lrs[3] == pytest.approx(1.52e-5, rel=0.01)


def test_clamp_to_the_optimiser_safe_range():
    assert lr_finder.clamp_lr(5.0, "sgd") == 1.0 and lr_finder.clamp_lr(1e-4, "sgd") == 0.01
    assert lr_finder.clamp_lr(0.3, "sgd") == 0.3 and lr_finder.clamp_lr(0.1, "adam") == 1e-2


@pytest.fixture(scope="module")
def convex_task():
    """Softmax regression on raw pixels, a convex problem whose good LR range is known from its curvature:
    the Hessian is (diag(p) - pp') (x) X'X/n, so with lam = lambda_max(X'X/n)
      - at initialisation (p uniform over K=10 classes) the curvature is lam/K: SGD diverges from the first
        steps above 2K/lam;
      - it never exceeds lam/2: SGD is stable everywhere below 4/lam.
    A sensible suggestion lies between (4/lam)/10 and 2K/lam."""
    split = data.make_synthetic(256, seed=8)
    x = split.images.reshape(len(split), -1).astype(np.float64) / 255.0
    lam = np.linalg.eigvalsh(x.T @ x / len(x))[-1]
    loader = data.make_loader(split, batch_size=64, train=True, seed=0)
    return loader, (4 / lam) / 10, 2 * 10 / lam


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def _final_loss(loader, lr, epochs=5):
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            loss = nn.functional.cross_entropy(model(images.permute(0, 3, 1, 2).float() / 255), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return loss.item()


def test_finds_a_sensible_lr_and_stops_on_divergence(convex_task):
    loader, low, diverges_above = convex_task
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = lr_finder.range_test(model, loader, opt, CPU, "fp32", start_lr=1e-6, end_lr=10.0, num_iter=120)
    assert low < result.suggested_lr < diverges_above
    assert result.diverged and len(result.lrs) < 120 and result.lrs[-1] > diverges_above
    assert result.lrs == sorted(result.lrs) and result.lrs[0] == pytest.approx(1e-6)
    # and it is a good LR in practice: 5 epochs at it beat 5 epochs at a tenth of it
    assert _final_loss(loader, result.suggested_lr) < _final_loss(loader, result.suggested_lr / 10)


def test_restores_model_and_optimizer_state_exactly(convex_task):
    loader, _, _ = convex_task
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader.sampler.set_epoch(1)
    images, labels = next(iter(loader))
    nn.functional.cross_entropy(model(images.permute(0, 3, 1, 2).float() / 255), labels).backward()
    opt.step()  # momentum buffers now exist
    before_model, before_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    lr_finder.range_test(model, loader, opt, CPU, "fp32", start_lr=1e-5, end_lr=1.0, num_iter=15)
    for k, v in before_model.items():
        assert torch.equal(v, model.state_dict()[k]), k
    after = opt.state_dict()
    assert after["param_groups"] == before_opt["param_groups"]
    for k, st in before_opt["state"].items():
        assert torch.equal(st["momentum_buffer"], after["state"][k]["momentum_buffer"])


def test_a_sweep_that_diverges_at_once_is_a_clear_error(convex_task):
    loader, _, _ = convex_task
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="start_lr=1000.0 is not allowed: the loss diverged after"):
        lr_finder.range_test(model, loader, opt, CPU, "fp32", start_lr=1e3, end_lr=1e6, num_iter=50)


def test_an_fp16_sweep_is_loss_scaled_as_training_is(convex_task, monkeypatch):
    """The range test takes training's own step (train_step.TrainStep): under fp16 each step goes through a
    GradScaler, which an unscaled backward (the range test's own copy of the step, before) never did."""
    loader, _, _ = convex_task
    scaled = []
    original = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, *a, **k: scaled.append(1) or original(self, *a, **k))
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = lr_finder.range_test(model, loader, opt, CPU, "fp16", start_lr=1e-5, end_lr=1e-2, num_iter=10)
    assert len(scaled) == len(result.lrs) == 10
