"""The device-resident loader (runs on CPU tensors here, as on a GPU): the same order, shards and batch count as
the worker DataLoader, deterministic per (seed, epoch), and its batched augmentation draws from the same
distribution as the albumentations presets (crop offsets, flip rate, hole positions)."""

import math

import numpy as np
import pytest
import torch

from cifar_mlflow import data
from cifar_mlflow.data.device_loader import DeviceLoader
from cifar_mlflow.training import augment

CPU = torch.device("cpu")
MEAN = (0.5, 0.5, 0.5)  # cutout fill 128 in every channel


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize(
    "n, batch, train", [(100, 32, True), (96, 32, True), (20, 32, True), (100, 32, False), (7, 3, False)]
)
def test_same_order_labels_and_batch_count_as_the_worker_loader(n, batch, train):
    split = data.make_synthetic(n, seed=1)
    workers = data.make_loader(split, batch_size=batch, train=train, seed=5)
    device = DeviceLoader(split, device=CPU, batch_size=batch, train=train, preset="none", seed=5)
    assert len(device) == len(workers)
    for epoch in (1, 2):
        a, b = _epoch(workers, epoch), _epoch(device, epoch)
        assert len(a) == len(b) == len(workers)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.dtype == torch.uint8


def test_shards_are_the_worker_loaders_shards():
    split = data.make_synthetic(50, seed=1)
    for rank in (0, 1):
        workers = data.make_loader(split, batch_size=8, train=True, seed=2, rank=rank, world=2)
        device = DeviceLoader(split, device=CPU, batch_size=8, train=True, seed=2, rank=rank, world=2)
        assert [y.tolist() for _, y in _epoch(workers, 3)] == [y.tolist() for _, y in _epoch(device, 3)]


def test_augmentation_is_fixed_by_seed_and_epoch_and_changes_between_epochs():
    split = data.make_synthetic(64, seed=1)

    def loader(seed):
        return DeviceLoader(split, device=CPU, batch_size=16, train=True, preset="standard", mean=MEAN, seed=seed)

    first, again = _epoch(loader(0), 2), _epoch(loader(0), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again)), "a resumed epoch sees the same images"
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, _epoch(loader(0), 3)))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, _epoch(loader(1), 2)))


def test_a_preset_without_a_batched_twin_is_refused():
    with pytest.raises(ValueError, match="augment='heavy' has no batched version on the device"):
        DeviceLoader(data.make_synthetic(4, seed=1), device=CPU, batch_size=2, train=True, preset="heavy")


# ------------------------------------------------------------------------------------- same distribution

N = 3000


def _coordinates() -> np.ndarray:
    """Images whose pixels say where they come from: channel 0 = 10 + 7 * row, channel 1 = 10 + 7 * column,
    channel 2 = 240 (a hole is where channel 2 holds the fill, 128)."""
    rows, cols = np.mgrid[0:32, 0:32]
    return np.stack([10 + 7 * rows, 10 + 7 * cols, np.full_like(rows, 240)], axis=-1).astype(np.uint8)


def _recover(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: the shift the crop made (-4..4 each way), flipped or not, and the hole's clipped bounds (or -1 without a hole)."""
    out = {k: [] for k in ("dy", "dx", "flip", "y0", "y1", "x0", "x1")}
    for img in images.astype(np.int64):
        hole = img[..., 2] == 128
        # an interior pixel outside the hole with its right neighbour: rows/cols 4-27 never come from the padding
        r, c = next((r, c) for r in range(4, 28) for c in range(4, 27) if not hole[r, c] and not hole[r, c + 1])
        src_row, src_col, next_col = (img[r, c, 0] - 10) // 7, (img[r, c, 1] - 10) // 7, (img[r, c + 1, 1] - 10) // 7
        flip = next_col < src_col
        out["flip"].append(flip)
        out["dy"].append(src_row - r)
        out["dx"].append(src_col - (31 - c if flip else c))
        ys, xs = np.where(hole.any(1))[0], np.where(hole.any(0))[0]
        bounds = (ys[0], ys[-1] + 1, xs[0], xs[-1] + 1) if len(ys) else (-1, -1, -1, -1)
        for k, v in zip(("y0", "y1", "x0", "x1"), bounds):
            out[k].append(v)
    return {k: np.asarray(v) for k, v in out.items()}


def _albumentations(preset: str) -> dict[str, np.ndarray]:
    t = augment.build_train_transform(preset, MEAN)
    img = _coordinates()
    outs = []
    for i in range(N):
        t.set_random_seed(i)
        outs.append(t(image=img)["image"])
    return _recover(np.stack(outs))


def _batched(preset: str) -> dict[str, np.ndarray]:
    split = data.Split(np.repeat(_coordinates()[None], N, axis=0), np.zeros(N, np.int64))
    loader = DeviceLoader(split, device=CPU, batch_size=500, train=True, preset=preset, mean=MEAN, seed=3)
    loader.sampler.set_epoch(1)
    return _recover(torch.cat([x for x, _ in loader]).numpy())


def _chi2_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Counts fit the probabilities (chi-square, p > 0.001; Wilson-Hilferty for the critical value)."""
    expected = counts.sum() * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    df, z = len(probs) - 1, 3.09
    return stat < df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _hole_start_probs(size=32, hole=16) -> np.ndarray:
    """P(clipped hole start = k): the centre is uniform over 0..size-1, start = max(centre - hole/2, 0)."""
    p = np.zeros(size - hole // 2)
    for centre in range(size):
        p[max(centre - hole // 2, 0)] += 1 / size
    return p


@pytest.fixture(scope="module", params=["standard", "flip-cutout"])
def both_paths(request):
    return request.param, _albumentations(request.param), _batched(request.param)


def test_crop_offsets_are_uniform_over_the_81_positions_on_both_paths(both_paths):
    preset, *paths = both_paths
    for got in paths:
        if preset == "standard":
            for key in ("dy", "dx"):
                assert _chi2_ok(np.bincount(got[key] + 4, minlength=9), np.full(9, 1 / 9)), key
        else:
            assert (got["dy"] == 0).all() and (got["dx"] == 0).all(), "flip-cutout does not translate"


def test_flip_rate_is_one_half_on_both_paths(both_paths):
    _, *paths = both_paths
    rates = [got["flip"].mean() for got in paths]
    assert all(abs(r - 0.5) < 4 * math.sqrt(0.25 / N) for r in rates), rates


def test_hole_rate_and_positions_match_on_both_paths(both_paths):
    preset, *paths = both_paths
    rate = 1.0 if preset == "standard" else 0.5
    probs = _hole_start_probs()
    for got in paths:
        has = got["y0"] >= 0
        assert abs(has.mean() - rate) < 4 * math.sqrt(max(rate * (1 - rate), 1e-4) / N)
        for start, end in (("y0", "y1"), ("x0", "x1")):
            assert _chi2_ok(np.bincount(got[start][has], minlength=len(probs)), probs), start
            side = got[end][has] - got[start][has]
            assert side.min() == 8 and side.max() == 16  # clipped at the border, 16 when inside


# ------------------------------------------------------------------------------------- wiring


def test_loader_device_with_a_preset_it_lacks_is_a_one_line_config_error():
    from cifar_mlflow.config import LRFindConfig, TrainConfig
    from cifar_mlflow.errors import ConfigError

    for config in (TrainConfig, LRFindConfig):
        with pytest.raises(
            ConfigError,
            match="loader='device' is not allowed with augment='heavy': the device "
            "loader has standard, flip-cutout, none; use loader=workers or auto",
        ):
            config(loader="device", augment="heavy")
    from cifar_mlflow.values import DEVICE_PRESETS

    assert DEVICE_PRESETS == tuple(augment.BATCH_RECIPES)


def test_auto_uses_the_device_loader_on_a_gpu_for_the_presets_it_has():
    from cifar_mlflow.training.prepare import resolve_loader

    cuda = torch.device("cuda")
    assert resolve_loader("auto", "standard", cuda) == resolve_loader("auto", "none", cuda) == "device"
    assert resolve_loader("auto", "heavy", cuda) == "workers"
    assert resolve_loader("auto", "standard", CPU) == "workers"
    assert (
        resolve_loader("device", "standard", CPU) == "device" and resolve_loader("workers", "none", cuda) == "workers"
    )


def test_training_through_prepare_on_the_device_loader():
    from cifar_mlflow.config import TrainConfig
    from cifar_mlflow.training import engine
    from cifar_mlflow.training.prepare import prepare

    cfg = TrainConfig(
        dataset="synthetic",
        max_train_samples=64,
        max_test_samples=32,
        batch_size=32,
        epochs=1,
        loader="device",
        precision="fp32",
    )
    setup = prepare(cfg, cfg.max_test_samples)
    assert isinstance(setup.train_loader, DeviceLoader) and isinstance(setup.test_loader, DeviceLoader)
    params = setup.derived_params()
    assert params["env/loader"] == "device" and params["env/num_workers"] == 0
    result = engine.fit(
        setup.model, setup.train_loader, setup.test_loader, cfg, setup.device, setup.precision, log=lambda s: None
    )
    assert math.isfinite(result.history[0]["train/loss"]) and result.history[0]["test/accuracy"] >= 0
    assert len(result.lr_steps) == 2


def test_emulated_precision_is_named():
    from cifar_mlflow.training import hardware

    assert hardware.precision_is_emulated("fp16", CPU) and not hardware.precision_is_emulated("fp32", CPU)
    assert hardware.precision_is_emulated("bf16", CPU) == (not hardware.cpu_has_native_bf16())
    assert not hardware.precision_is_emulated("bf16", torch.device("cuda"))
