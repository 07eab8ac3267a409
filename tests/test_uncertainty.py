"""Calibration of predicted std: exact on synthetic Gaussians, and end to end on a toy cross-validation run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm

from hist_st.errors import InputError
from hist_st.experiments.uncertainty import LEVELS, calibration, run_uncertainty
from hist_st.train.toy import write_toy_cohort

TINY = ["model.dim=32", "model.heads=4", "genes.n_top=6", "epochs=2", "progress=false"]


def test_calibration_of_a_true_gaussian_std():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.05, 1.0, (400, 50))
    mu = rng.normal(0, 1, (400, 50))
    y = mu + sigma * rng.standard_normal((400, 50))
    c = calibration(mu, sigma, y)
    assert c["coverage_50"] == pytest.approx(0.5, abs=0.01) and c["coverage_90"] == pytest.approx(0.9, abs=0.01)
    for p in LEVELS:
        assert c["curve"][float(p)] == pytest.approx(p, abs=0.015)
    assert c["spearman"] > 0.3 and c["mae_least_confident_decile"] > 5 * c["mae_most_confident_decile"]
    # an uninformative std: no rank correlation, deciles alike
    flat = calibration(mu, rng.permutation(sigma.ravel()).reshape(sigma.shape), y)
    assert abs(flat["spearman"]) < 0.03
    # too narrow intervals under-cover
    assert calibration(mu, sigma / 4, y)["coverage_90"] == pytest.approx(2 * norm.cdf(1.645 / 4) - 1, abs=0.02)


def test_uncertainty_end_to_end_on_a_toy_cv(tmp_path):
    from hist_st.evaluate import cross_validate
    from hist_st.train import load_config

    cohort = write_toy_cohort(tmp_path / "toy", n_slides=4, n_spots=80, n_genes=10, dim=16)
    runs = []
    for seed in (0, 1):
        cfg = load_config(None, [*TINY, f"seed={seed}"])
        cross_validate(cfg, cohort, tmp_path / f"cv{seed}", k=2, folds=None if seed == 0 else tmp_path / "cv0" / "splits.json",
               progress=False)
        runs.append(tmp_path / f"cv{seed}")
    res = run_uncertainty(runs, cohort, tmp_path / "u", mc_samples=4)
    assert set(res["methods"]) == {"mc_dropout", "mc_dropout_recalibrated", "ensemble", "ensemble_recalibrated"}
    m = res["methods"]["mc_dropout"]
    from hist_st.train.data import load_slides

    n_spots = sum(s.n_spots for s in load_slides(cohort))  # every slide is held out once
    assert m["n"] == n_spots * 6 and 0 <= m["coverage_50"] <= m["coverage_90"] <= 1 and m["mean_sigma"] > 0
    assert res["methods"]["mc_dropout_recalibrated"]["coverage_50"] == pytest.approx(0.5, abs=0.25)
    assert (tmp_path / "u" / "calibration.png").stat().st_size > 1000
    assert json.loads((tmp_path / "u" / "uncertainty.json").read_text())["mc_samples"] == 4
    with pytest.raises(InputError, match="splits file not found"):
        run_uncertainty([tmp_path / "toy"], cohort, tmp_path / "bad")
