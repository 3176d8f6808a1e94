"""Augmentation presets: each transform of `standard` really changes images, with 2.x argument names."""

import warnings

import numpy as np
import pytest

from cifar_mlflow import data
from cifar_mlflow.training import augment

MEAN = (0.5, 0.4, 0.3)


@pytest.fixture(scope="module")
def images():
    return data.make_synthetic(64, seed=9).images


def _apply(t, img, seed):
    t.set_random_seed(seed)
    return t(image=img)["image"]


def test_standard_builds_without_warnings_and_lists_its_transforms():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # albumentations warns (and ignores) 1.x argument names
        t = augment.build_train_transform("standard", MEAN)
    names = [type(x).__name__ for x in t.transforms]
    assert names == ["PadIfNeeded", "RandomCrop", "HorizontalFlip", "Cutout"]
    text = augment.describe(t)
    assert "hole_height_range=(16, 16)" in text and "min_height=40" in text
    assert "centred anywhere in the image and clipped at the border (DeVries & Taylor 2017" in text


def test_standard_changes_images_keeps_shape(images):
    t = augment.build_train_transform("standard", MEAN)
    out = np.stack([_apply(t, img, i) for i, img in enumerate(images)])
    assert out.shape == images.shape and out.dtype == np.uint8
    assert all(not np.array_equal(a, b) for a, b in zip(out, images))


def _holes(n=4000):
    """The hole of the standard preset's cutout on n blank images: (masks, fill colours)."""
    t = augment.build_train_transform("standard", MEAN).transforms[3]
    img = np.full((32, 32, 3), 255, np.uint8)
    outs = np.stack([_apply(t, img, i) for i in range(n)])
    return (outs != 255).all(axis=3), outs


def test_cutout_is_one_16x16_hole_filled_with_the_mean():
    masks, outs = _holes(200)
    inside = [m for m in masks if m.sum() == 16 * 16]
    assert inside, "a hole whose centre is at least 8 px from every border is a whole 16x16 square"
    for m in inside:
        rows, cols = np.where(m.any(1))[0], np.where(m.any(0))[0]
        assert len(rows) == len(cols) == 16 and rows[-1] - rows[0] == cols[-1] - cols[0] == 15
    assert {tuple(o[m][0]) for o, m in zip(outs, masks)} == {augment.cutout_fill(MEAN)} == {(128, 102, 76)}


def test_cutout_centres_holes_anywhere_as_the_paper_does():
    """DeVries & Taylor (2017): the centre is uniform over the image and the hole is clipped at the border.
    Then a 16x16 hole covers 14 x 14 = 196 px on average (each side: 16 when the centre is 8+ px inside,
    12 on average in the outer 8 px), the image centre is covered a quarter of the time and a corner pixel
    1/16 of it. (A hole kept fully inside, albumentations' CoarseDropout, always covers 256 px and the centre.)"""
    masks, _ = _holes()
    areas = masks.sum(axis=(1, 2))
    assert 190 < areas.mean() < 202 and areas.min() == 8 * 8 and areas.max() == 16 * 16
    cover = masks.mean(axis=0)
    assert 0.22 < cover[15, 15] < 0.28 and 0.22 < cover[16, 16] < 0.28
    assert 0.04 < cover[0, 0] < 0.09 and 0.04 < cover[31, 31] < 0.09
    assert 0.1 < cover[0, :].mean() < 0.2, "holes do reach past the border"


def test_pad_crop_shifts_and_flip_mirrors(images):
    t = augment.build_train_transform("standard", MEAN)
    pad_crop = [t.transforms[0], t.transforms[1]]
    shifted = 0
    for i, img in enumerate(images[:20]):
        x = img
        for tr in pad_crop:
            tr.set_random_seed(i)
            x = tr(image=x)["image"]
        shifted += not np.array_equal(x, img)
    assert shifted >= 15  # 80 of 81 crop offsets move the image
    flip = t.transforms[2]
    flipped = [_apply(flip, images[0], s) for s in range(20)]
    assert any(np.array_equal(f, images[0][:, ::-1]) for f in flipped)
    assert any(np.array_equal(f, images[0]) for f in flipped)


def test_none_preset():
    assert augment.build_train_transform("none", MEAN) is None
    assert "no augmentation" in augment.describe(None)


def test_unknown_preset():
    with pytest.raises(ValueError, match="augment='heavy!' is not allowed"):
        augment.build_train_transform("heavy!", MEAN)


@pytest.mark.parametrize("preset", ["standard", "flip-cutout", "heavy", "rotate"])
def test_every_transform_of_every_preset_changes_images(preset, images):
    """Each transform, forced on (p=1), changes most images it is given: none is a silent no-op (as a 1.x
    argument name would make it under albumentations 2.x)."""
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transforms = augment.build_train_transform(preset, MEAN).transforms
    for position, t in enumerate(transforms):
        forced = copy.deepcopy(t)
        forced.p = 1.0
        changed = 0
        for i, img in enumerate(images[:20]):
            x = img
            for earlier in transforms[:position]:  # what this transform really receives in the pipeline
                x = _apply(earlier, x, 1000 + i)
            out = _apply(forced, x, i)
            changed += out.shape != x.shape or not np.array_equal(out, x)
        assert changed >= 16, f"{preset}: {type(t).__name__} changed only {changed}/20 images"


def test_heavy_keeps_hue_bounded_and_uses_a_half_size_hole():
    t = augment.build_train_transform("heavy", MEAN)
    jitter = next(x for x in t.transforms if type(x).__name__ == "ColorJitter")
    assert max(abs(h) for h in jitter.hue) <= 0.05
    cutout = next(x for x in t.transforms if type(x).__name__ == "Cutout")
    assert cutout.hole_height_range == (16, 16) and cutout.hole_width_range == (16, 16)
    assert [type(x).__name__ for x in t.transforms] == ["HorizontalFlip", "Affine", "Cutout", "ColorJitter", "ToGray"]
