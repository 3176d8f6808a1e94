"""Engine: learns (overfits a tiny batch), is deterministic on CPU, schedules the LR as documented, and reads
the device inside the batch loop only for the NaN check every NAN_CHECK_EVERY steps."""

import sys

import numpy as np
import pytest
import torch

from cifar_mlflow import data, models
from cifar_mlflow.analysis import gradcam_panel
from cifar_mlflow.config import TrainConfig
from cifar_mlflow.training import augment, engine, hardware, inference, optim, train_step

CPU = torch.device("cpu")
# What `precision=auto` picks here: bf16 only where the CPU runs it natively (AVX512-BF16/AMX); elsewhere bf16 is
# emulated and 10x+ slower, so tests that only need "a mixed-precision-capable run" use this, never a forced bf16.
AUTO = hardware.resolve_precision("auto", CPU)


class TinyNet(torch.nn.Module):
    """ResNet18's interface in ~6,000 parameters (normalisation inside, conv feature maps, logits out): engine.fit
    takes any nn.Module, so the tests of its plumbing (schedules, callbacks, precision, host syncs, determinism,
    resume) run this one; ResNet18 itself is built in test_models.py, overfits a batch here and learns real
    images in test_learning.py."""

    def __init__(self, num_classes: int, mean, std, norm: str = "batch") -> None:
        super().__init__()
        norm_layer = models.norm_layer(norm)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
            norm_layer(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            norm_layer(16),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
            norm_layer(32),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.fc = torch.nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features((x - self.mean) / self.std))


def _setup(
    n_train=64,
    n_test=32,
    batch_size=32,
    seed=0,
    augment_preset="standard",
    norm="batch",
    arch="tiny",
    width=64,
    **cfg_kw,
):
    split = data.make_synthetic(n_train, seed=1)
    test = data.make_synthetic(n_test, seed=2)
    mean, std = data.channel_stats(split.images)
    engine.seed_everything(seed)
    if arch == "tiny":
        model = TinyNet(len(data.SYNTHETIC_CLASSES), mean, std, norm)
    else:
        model = models.build_model(models.ModelSpec(arch, data.SYNTHETIC_CLASSES, mean, std, norm, width=width))
    model = model.to(memory_format=torch.channels_last)
    tf = augment.build_train_transform(augment_preset, mean)
    train_loader = data.make_loader(split, batch_size=batch_size, train=True, transform=tf, seed=seed)
    test_loader = data.make_loader(test, batch_size=batch_size, train=False)
    cfg = TrainConfig(batch_size=batch_size, seed=seed, augment=augment_preset, norm=norm, width=width, **cfg_kw)
    return model, train_loader, test_loader, cfg


def test_overfits_a_tiny_batch():
    model, train_loader, _, cfg = _setup(
        arch="resnet18",
        width=16,
        n_train=16,
        batch_size=16,
        augment_preset="none",
        epochs=40,
        scheduler="none",
        lr=0.02,
        label_smoothing=0.0,
        weight_decay=0.0,
    )
    first = last = None
    optimizer = optim.build_optimizer(cfg, model.parameters())
    scheduler = optim.build_scheduler(cfg, optimizer, len(train_loader))
    for _epoch in range(cfg.epochs):
        m = engine.train_one_epoch(train_step.TrainStep(model, optimizer, CPU, AUTO), train_loader, scheduler).metrics
        first = first or m
        last = m
    assert first["train/loss"] > 1.5
    assert last["train/loss"] < 0.1 and last["train/accuracy"] == 1.0
    assert engine.evaluate(model, train_loader, CPU, "fp32")["test/accuracy"] == 1.0


def _fit(seed):
    model, tr, te, cfg = _setup(seed=seed, epochs=2, lr=0.05)
    result = engine.fit(model, tr, te, cfg, CPU, AUTO, log=lambda s: None)
    return result, model


def test_fit_is_deterministic_for_a_seed_on_cpu():
    def learned(result):  # everything but wall-clock throughput
        return [{k: v for k, v in m.items() if k != "train/images_per_sec"} for m in result.history]

    (a, model_a), (b, model_b) = _fit(3), _fit(3)
    assert learned(a) == learned(b)
    for pa, pb in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(pa, pb)
    c, _ = _fit(4)
    assert learned(c) != learned(a)


def test_fit_reports_every_epoch_through_the_callback():
    model, tr, te, cfg = _setup(epochs=2, n_train=32)
    seen = []
    result = engine.fit(
        model, tr, te, cfg, CPU, "fp32", on_epoch_end=lambda e, m, capture: seen.append((e, m)), log=lambda s: None
    )
    assert [e for e, _ in seen] == [1, 2] and [m for _, m in seen] == result.history
    assert set(result.history[-1]) == {
        "train/loss",
        "train/accuracy",
        "train/images_per_sec",
        "lr",
        "test/loss",
        "test/accuracy",
    }
    assert all(0 <= m[k] <= 1 for m in result.history for k in ("train/accuracy", "test/accuracy"))


def _lr_curve(scheduler, epochs=5, steps_per_epoch=20, test_losses=None, lr=0.2):
    cfg = TrainConfig(epochs=epochs, lr=lr, scheduler=scheduler)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = optim.build_scheduler(cfg, opt, steps_per_epoch=steps_per_epoch)
    lrs = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.after_step()
        schedule.after_epoch(test_losses[epoch] if test_losses else 1.0)
    return lrs


def test_onecycle_warms_up_to_the_peak_then_decays_to_zero():
    lrs = _lr_curve("onecycle")
    peak = max(range(100), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(0.2) and 15 <= peak <= 25  # peaks at ~20% of the run
    assert lrs[0] == pytest.approx(0.2 / 25) and 0 <= lrs[-1] < 1e-4  # starts low, ends ~0, never negative
    assert all(x >= 0 for x in lrs)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 10])
def test_onecycle_runs_however_few_the_steps(steps):
    """torch's OneCycleLR divides by zero when its warm-up ends at step 0 (5 steps at pct_start 0.2): one epoch
    of 320 images at batch 64 crashed there."""
    lrs = _lr_curve("onecycle", epochs=1, steps_per_epoch=steps)
    assert len(lrs) == steps and all(0 <= x <= 0.2 + 1e-9 for x in lrs)


def test_lr_metric_is_the_lr_of_the_last_step():
    model, tr, te, cfg = _setup(epochs=2, n_train=64)
    result = engine.fit(model, tr, te, cfg, CPU, "fp32", log=lambda s: None)
    assert 0 <= result.history[-1]["lr"] < 1e-4 < result.history[0]["lr"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_trains_on_cpu(precision):
    # fp16 autocast is emulated on CPU (~10x slower than bf16): keep the batch tiny.
    model, tr, te, cfg = _setup(n_train=8, n_test=8, batch_size=8, epochs=1)
    result = engine.fit(model, tr, te, cfg, CPU, precision, log=lambda s: None)
    assert result.history[-1]["train/loss"] > 0


def test_precision_resolution():
    assert hardware.resolve_precision("fp32", CPU) == "fp32"
    assert hardware.resolve_precision("fp16", CPU) == "fp16"
    assert hardware.resolve_precision("auto", CPU) == ("bf16" if hardware.cpu_has_native_bf16() else "fp32")


def test_optimizers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = optim.build_optimizer(TrainConfig(), params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 5e-4
    assert not optim.build_optimizer(TrainConfig(momentum=0.0), params).defaults["nesterov"]
    assert isinstance(optim.build_optimizer(TrainConfig(optimizer="adamw"), params), torch.optim.AdamW)
    assert isinstance(optim.build_optimizer(TrainConfig(optimizer="adam"), params), torch.optim.Adam)


@pytest.mark.parametrize("n_train", [32, 88], ids=["8-batches", "22-batches"])
def test_no_host_sync_inside_the_batch_loop(monkeypatch, n_train):
    """Reading a tensor on the host (.item/.tolist/.cpu/.numpy/bool) stalls a GPU pipeline. Training reads once
    per epoch (loss, correct count, samples and NaN step in one tolist) plus one NaN check every 10 steps;
    evaluation reads once per pass, however many batches there are."""
    model, tr, te, cfg = _setup(n_train=n_train, batch_size=4, epochs=1)
    # the engine and the modules its loops run: the training step, the inference loop, device transfers
    loop_files = {m.__file__ for m in (engine, train_step, inference, hardware)}
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            if sys._getframe(1).f_code.co_filename in loop_files:  # reads made by the engine itself
                calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    optimizer = optim.build_optimizer(cfg, model.parameters())
    scheduler = optim.build_scheduler(cfg, optimizer, len(tr))
    tr.sampler.set_epoch(1)
    engine.train_one_epoch(train_step.TrainStep(model, optimizer, CPU, "fp32", 0.1), tr, scheduler)
    train_calls = list(calls)
    calls.clear()
    engine.evaluate(model, te, CPU, "fp32")
    assert train_calls == ["item"] * (len(tr) // engine.NAN_CHECK_EVERY) + ["tolist"], train_calls
    assert calls == ["tolist"], calls  # evaluation: one read of (loss, correct, seen) at the end


def test_cosine_decays_from_lr_to_zero():
    lrs = _lr_curve("cosine")
    assert lrs[0] == pytest.approx(0.2) and lrs[50] == pytest.approx(0.1, rel=0.05) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cyclic_triangular2_halves_its_amplitude():
    lrs = _lr_curve("cyclic", epochs=8, steps_per_epoch=10)  # half cycle = 2 epochs = 20 steps
    assert lrs[0] == pytest.approx(0.02) and lrs[20] == pytest.approx(0.2) and lrs[40] == pytest.approx(0.02)
    assert lrs[60] == pytest.approx(0.02 + 0.18 / 2)  # second peak: half the amplitude


def test_plateau_cuts_the_lr_when_the_test_loss_stalls():
    lrs = _lr_curve("plateau", epochs=6, steps_per_epoch=2, test_losses=[1.0, 0.9, 0.9, 0.9, 0.9, 0.9])
    per_epoch = lrs[::2]
    assert per_epoch[:5] == pytest.approx([0.2] * 5) and per_epoch[5] == pytest.approx(0.02)


def test_none_keeps_the_lr():
    assert set(_lr_curve("none")) == {0.2}


def test_l1_penalty_shrinks_weights():
    norms = {}
    for l1 in (0.0, 1e-3):
        model, tr, te, cfg = _setup(
            n_train=32, epochs=1, augment_preset="none", scheduler="none", lr=0.01, weight_decay=0.0, l1=l1
        )
        optimizer = optim.build_optimizer(cfg, model.parameters())
        tr.sampler.set_epoch(1)
        step = train_step.TrainStep(model, optimizer, CPU, "fp32", l1=cfg.l1)
        engine.train_one_epoch(step, tr, optim.build_scheduler(cfg, optimizer, len(tr)))
        norms[l1] = sum(p.abs().sum().item() for p in train_step.l1_weights(model))
    assert norms[1e-3] < norms[0.0]


def test_fit_records_every_step_lr():
    model, tr, te, cfg = _setup(epochs=2, n_train=64, scheduler="cosine")
    result = engine.fit(model, tr, te, cfg, CPU, "fp32", log=lambda s: None)
    # lr=scaled at this batch size (32): 0.2 * 32 / 512
    assert len(result.lr_steps) == 2 * len(tr) and result.lr_steps[0] == pytest.approx(0.0125)


def test_flip_tta_accuracy_is_a_fraction_and_sees_the_mirror():
    model, _, te, _ = _setup(n_test=40)
    acc = engine.evaluate_flip_tta(model, te, CPU, "fp32")
    assert 0 <= acc <= 1 and acc * 40 == int(round(acc * 40))


def test_fit_measures_flip_tta_with_the_last_epochs_test_metrics():
    """fit(flip_tta=True) gets the final model's flip-TTA accuracy from the last epoch's evaluation (one pass over
    the test set fewer than evaluate_flip_tta after fit): the same figure, and the same plain metrics."""
    model, tr, te, cfg = _setup(n_train=32, n_test=40, batch_size=16, epochs=2)
    result = engine.fit(model, tr, te, cfg, CPU, "fp32", log=lambda s: None, flip_tta=True)
    assert result.flip_tta == engine.evaluate_flip_tta(model, te, CPU, "fp32")
    final = engine.evaluate(model, te, CPU, "fp32")
    assert {k: result.history[-1][k] for k in final} == final
    # resumed after its last epoch: no evaluation left to measure it in, so measured on its own
    states = {}
    engine.fit(
        model, tr, te, cfg, CPU, "fp32", log=lambda s: None, on_epoch_end=lambda e, m, c: states.update({e: c()})
    )
    done = engine.fit(model, tr, te, cfg, CPU, "fp32", log=lambda s: None, resume=states[2], flip_tta=True)
    assert done.flip_tta == engine.evaluate_flip_tta(model, te, CPU, "fp32")
    assert engine.fit(model, tr, te, cfg, CPU, "fp32", log=lambda s: None).flip_tta is None  # not asked


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_norm_variants_train(norm):
    model, tr, te, cfg = _setup(n_train=16, n_test=8, batch_size=8, epochs=1, norm=norm, arch="resnet18")
    result = engine.fit(model, tr, te, cfg, CPU, AUTO, log=lambda s: None)
    assert result.history[-1]["train/loss"] > 0


def test_nan_loss_stops_training_at_once_naming_the_step():
    from cifar_mlflow.errors import TrainingDiverged

    model, tr, te, cfg = _setup(n_train=256, batch_size=16, epochs=2, lr=1e6, scheduler="none", momentum=0.0)
    seen = []
    with pytest.raises(TrainingDiverged) as err:
        engine.fit(model, tr, te, cfg, CPU, "fp32", on_epoch_end=lambda *a: seen.append(a), log=lambda s: None)
    assert 1 <= err.value.step <= 16 and err.value.epoch == 1 and not seen, "stopped inside epoch 1"
    assert f"at step {err.value.step} (epoch 1)" in str(err.value)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_fit():
    from cifar_mlflow.training import checkpoint

    def run(stop_after=None, resume=None):
        model, tr, te, cfg = _setup(epochs=3, n_train=64, seed=2)
        states = {}
        try:
            engine.fit(
                model,
                tr,
                te,
                cfg,
                CPU,
                AUTO,
                log=lambda s: None,
                resume=resume,
                on_epoch_end=lambda e, m, capture: (
                    states.update({e: capture()}) or (e == stop_after and (_ for _ in ()).throw(KeyboardInterrupt))
                ),
            )
        except KeyboardInterrupt:
            pass
        return model, states

    full, _ = run()
    _, states = run(stop_after=1)
    path = "/tmp/_resume_test.pt"
    checkpoint.save(states[1], path)
    resumed, _ = run(resume=checkpoint.load(path))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "every, epochs, expected",
    [
        (-1, 20, [1, 4, 8, 12, 16, 20]),
        (-1, 3, [1, 2, 3]),
        (-1, 1, [1]),
        (-1, 7, [1, 2, 4, 6, 7]),
        (0, 20, []),
        (7, 20, [7, 14, 20]),
        (1, 3, [1, 2, 3]),
        (50, 3, [3]),
    ],
)
def test_panel_epochs(every, epochs, expected):
    assert gradcam_panel.panel_epochs(every, epochs) == expected


def test_panel_shows_one_test_image_per_class_with_gradcam():
    split = data.make_synthetic(60, seed=3)
    idx = gradcam_panel.panel_indices(split.labels, 10)
    assert split.labels[idx].tolist() == list(range(10))
    torch.manual_seed(0)
    model = models.build_model(models.ModelSpec("resnet18", data.SYNTHETIC_CLASSES, (0.5,) * 3, (0.25,) * 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    panel = gradcam_panel.compute_panel(model, split, idx, data.SYNTHETIC_CLASSES, epoch=4)
    assert panel.maps.shape == (10, 32, 32) and 0 <= panel.maps.min() and panel.maps.max() <= 1
    assert list(panel.true_names) == list(data.SYNTHETIC_CLASSES)
    assert all(0 < c <= 1 for c in panel.confidence)
    # computing a panel changes no weights, no BatchNorm statistics and which parameters train
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    probs = models.predict_proba(model, torch.from_numpy(split.images[idx].transpose(0, 3, 1, 2) / 255.0).float())
    assert list(panel.pred_names) == [data.SYNTHETIC_CLASSES[i] for i in probs.argmax(1).tolist()]
    np.testing.assert_allclose(panel.confidence, probs.max(1).values.numpy(), atol=1e-5)
    assert panel.figure().get_suptitle().startswith("epoch 4:")
