"""bench superres: Gaussian interpolation against a loop, gap closed, and the whole experiment on a toy cohort."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hist_st.errors import InputError
from hist_st.experiments.accuracy import CVSetup
from hist_st.experiments.superres import METHODS, gap_closed, gaussian_interpolate, run_superres


def test_gaussian_interpolation_against_a_loop():
    rng = np.random.default_rng(0)
    fine, coarse, vals = rng.uniform(0, 10, (12, 2)), rng.uniform(0, 10, (5, 2)), rng.uniform(0, 3, (5, 4))
    got = gaussian_interpolate(fine, coarse, vals, sigma=2.0)
    for i in range(12):
        w = np.array([np.exp(-np.sum((fine[i] - c) ** 2) / 8.0) for c in coarse])
        assert np.allclose(got[i], (w[:, None] * vals).sum(0) / w.sum())
    # a point on a coarse centre with a tiny sigma takes that centre's value; far points do not underflow
    assert np.allclose(gaussian_interpolate(coarse[:1], coarse, vals, 1e-3), vals[:1])
    assert np.isfinite(gaussian_interpolate(np.array([[1e4, 1e4]]), coarse, vals, 0.1)).all()
    with pytest.raises(InputError, match="sigma"):
        gaussian_interpolate(fine, coarse, vals, 0.0)


def test_gap_closed():
    assert gap_closed(0.3, 0.2, 0.4) == pytest.approx(0.5)
    assert gap_closed(0.1, 0.2, 0.4) == pytest.approx(-0.5)
    assert np.isnan(gap_closed(0.1, 0.2, 0.2))


def test_superres_end_to_end_on_a_toy_cohort(tmp_path):
    from hist_st.train.toy import write_toy_cohort

    cohort = write_toy_cohort(tmp_path / "toy", n_slides=3, n_spots=64, n_genes=8, dim=16)
    setup = CVSetup(genes="he:5", folds=3, overrides=["model.dim=16", "model.heads=2", "epochs=1", "threads=1"],
                    progress=False)
    res = run_superres(cohort, tmp_path / "sr", setup=setup)
    assert set(res["methods"]) == set(METHODS) and len(res["folds"]) == 3
    assert set(res["gap_closed"]) == {"superres", "coarse_smooth"}
    assert len(res["gap_closed_per_fold"]["superres"]["per_gene_pcc"]) == 3
    for sid, n in res["n_spots"].items():
        assert n / 4 <= res["n_coarse_spots"][sid] < n
        assert res["coarse_pitch_um"][sid] == pytest.approx(2 * res["fine_pitch_um"][sid], rel=0.02)
    data = np.load(tmp_path / "sr" / "fold_0" / "predictions" / f"{res['folds'][0]['test'][0]}.npz")
    # reference (a): every member of a block gets the same prediction
    for m in np.unique(data["groups"]):
        rows = data["coarse_copy"][data["groups"] == m]
        assert np.allclose(rows, rows[0])
    assert (tmp_path / "sr" / res["figure"]).stat().st_size > 5000
    assert "gap closed" in (tmp_path / "sr" / "table.md").read_text()
    assert json.loads((tmp_path / "sr" / "superres.json").read_text())["block"] == 2
    assert res["cached_models"] == []
    # a second call takes every fold model from the result cache (same config, slides, genes): equal numbers
    stamp = (tmp_path / "sr" / "fold_0" / "spot" / "model.pt").stat().st_mtime_ns
    again = run_superres(cohort, tmp_path / "sr", setup=setup)
    assert (tmp_path / "sr" / "fold_0" / "spot" / "model.pt").stat().st_mtime_ns == stamp
    assert len(again["cached_models"]) == 9 and "fold_0/superres" in again["cached_models"]
    assert again["methods"] == res["methods"] and "result cache" in (tmp_path / "sr" / "table.md").read_text()
    # a model file that is no longer the one the cache recorded is trained again
    (tmp_path / "sr" / "fold_0" / "spot" / "model.pt").write_bytes(b"other")
    third = run_superres(cohort, tmp_path / "sr", setup=setup)
    assert "fold_0/spot" not in third["cached_models"] and len(third["cached_models"]) == 8
    with pytest.raises(InputError, match="--block"):
        run_superres(cohort, tmp_path / "bad", block=1)


def test_position_effect_sees_a_fixed_split_and_not_noise():
    from hist_st.experiments.superres import position_effect

    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(200), 4)
    position = np.tile(np.arange(4), 200)
    block_level = rng.normal(0, 1, (200, 5))[groups]
    assert position_effect(block_level, position, groups) == pytest.approx(0.0, abs=1e-12)
    noisy = block_level + rng.normal(0, 0.5, block_level.shape)
    split = block_level + np.array([0.6, -0.6, 0.6, -0.6])[position][:, None]
    assert position_effect(split, position, groups) > 5 * position_effect(noisy, position, groups)
