"""Coordinate augmentation: geometric properties, the schedule, dropout rate, step keys in workers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hist_st.train.augment import (
    augment_coords,
    dropout_probability,
    mirror,
    rotate,
    schedule_strength,
    shear,
    transform_probability,
)
from hist_st.train.config import AugmentConfig


def _cloud(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 40, size=(n, 2)) + np.array([5.0, 17.0])


def test_rotation_and_shear_preserve_centroid_and_distances():
    xy = _cloud()
    z = xy - xy.mean(0)
    for angle in (0.3, math.pi / 2, 2.0):
        r = rotate(z, angle)
        np.testing.assert_allclose(r.mean(0), 0, atol=1e-9)
        d0 = np.linalg.norm(z[:50, None] - z[None, :50], axis=-1)
        d1 = np.linalg.norm(r[:50, None] - r[None, :50], axis=-1)
        np.testing.assert_allclose(d0, d1, atol=1e-9)  # rigid
    for axis in (0, 1):
        s = shear(z, math.tan(math.radians(15)), axis)
        np.testing.assert_allclose(s.mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(s[:, 1 - axis], z[:, 1 - axis])  # the other axis is untouched
    np.testing.assert_allclose(rotate(z, math.pi / 2), np.stack([-z[:, 1], z[:, 0]], 1), atol=1e-12)


def test_full_augmentation_preserves_centroid_without_dropout():
    xy = _cloud()
    for variant in ("paper", "authors"):
        cfg = AugmentConfig(variant=variant, dropout=0.0)
        for seed in range(5):
            out, keep = augment_coords(xy, np.random.default_rng(seed), cfg, strength=1.0)
            assert len(keep) == len(xy)
            np.testing.assert_allclose(out.mean(0), xy.mean(0), atol=1e-9)


def test_mirror_is_an_involution():
    z = _cloud() - 20
    for axis in (0, 1):
        np.testing.assert_array_equal(mirror(mirror(z, axis), axis), z)
        assert not np.allclose(mirror(z, axis), z)


def test_schedule_endpoints_and_monotone():
    cfg = AugmentConfig()
    s = [schedule_strength(e, 100, cfg) for e in range(100)]
    assert s[0] == pytest.approx(1.0) and s[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(s, s[1:]))
    assert schedule_strength(50, 100, AugmentConfig(schedule="constant")) == 1.0
    assert dropout_probability(s[0], cfg) == pytest.approx(0.2)
    assert dropout_probability(s[-1], cfg) == pytest.approx(0.04)
    # the authors' variant: keep 25% at full strength
    assert dropout_probability(1.0, AugmentConfig(variant="authors")) == pytest.approx(0.75)


@pytest.mark.parametrize("epoch", [0, 10, 19])
def test_dropout_rate_follows_schedule(epoch):
    xy = _cloud(20000)
    cfg = AugmentConfig()
    strength = schedule_strength(epoch, 20, cfg)
    p = dropout_probability(strength, cfg)
    _, keep = augment_coords(xy, np.random.default_rng(epoch), cfg, strength)
    dropped = 1 - len(keep) / len(xy)
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / len(xy)) + 1e-3
    assert np.all(np.diff(keep) > 0)


@pytest.mark.parametrize(
    "kw, strength, expected",
    [
        ({}, 1.0, 1.0),  # paper: every transform at full strength...
        ({}, 0.2, 0.2),  # ...and with probability 0.2 at the last epoch
        ({"schedule_probability": False}, 0.2, 1.0),  # hist-st before issue 16: geometry never decays
        ({"variant": "authors"}, 0.2, 0.15),  # authors' intended: 0.75 x strength
        ({"variant": "authors"}, 1.0, 0.75),  # authors' effective (constant strength 1)
    ],
)
def test_transform_probability_follows_the_schedule(kw, strength, expected):
    """Issue 16, deviation 1: the strength scales each geometric transform's probability (paper text),
    measured by how often a rotation-only augmentation moves the spots."""
    cfg = AugmentConfig(mirror=False, shear=False, dropout=0.0, **kw)
    assert transform_probability(strength, cfg) == pytest.approx(expected)
    xy = _cloud(50)
    trials = 2000
    moved = sum(
        not np.allclose(augment_coords(xy, np.random.default_rng(i), cfg, strength)[0], xy) for i in range(trials)
    )
    assert abs(moved / trials - expected) < 4 * math.sqrt(max(expected * (1 - expected), 1e-3) / trials)


def test_disabled_is_identity_and_rng_determinism():
    xy = _cloud()
    out, keep = augment_coords(xy, np.random.default_rng(0), AugmentConfig(enabled=False), 1.0)
    np.testing.assert_array_equal(out, xy)
    np.testing.assert_array_equal(keep, np.arange(len(xy)))
    a = augment_coords(xy, np.random.default_rng(3), AugmentConfig(), 0.7)
    b = augment_coords(xy, np.random.default_rng(3), AugmentConfig(), 0.7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_min_spots_kept():
    xy = _cloud(40)
    _, keep = augment_coords(xy, np.random.default_rng(0), AugmentConfig(dropout=1.0, min_spots=16), 1.0)
    assert len(keep) == 16


def test_bad_augment_config():
    from hist_st.errors import InputError

    with pytest.raises(InputError, match="variant"):
        AugmentConfig(variant="mine")
    with pytest.raises(InputError, match="dropout"):
        AugmentConfig(dropout=1.5)


def test_strength_reaches_dataloader_workers():
    """The authors' bug: the schedule never reached the workers. Here the strength travels in the step key."""
    from hist_st.train.data import AugmentedSlides, KeySampler, SlideData, StepKey

    n = 2000
    xy = np.stack(np.meshgrid(np.arange(50.0), np.arange(40.0)), -1).reshape(-1, 2)  # a clean lattice
    slide = SlideData("s", xy, torch.zeros(n, 3), torch.zeros(n, 2))
    ds = AugmentedSlides([slide], AugmentConfig(variant="authors", p_transform=0.0),
                         lambda lat, feats: lat)
    keys = [StepKey(0, e, s, 0) for e, s in enumerate((1.0, 0.0))]
    loader = torch.utils.data.DataLoader(ds, sampler=KeySampler(keys), batch_size=None, num_workers=1,
                                         collate_fn=lambda x: x)
    kept = [item["n_kept"] for item in loader]
    assert abs(kept[0] / n - 0.25) < 0.05  # strength 1: keep 25%
    assert kept[1] == n  # strength 0: no dropout
