"""Calibration-token analysis metrics (Table 6) on constructed vectors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from hist_st.experiments.tokens import cosine_distances, format_token_table, token_metrics


def _separated(n_per: int = 4, n_groups: int = 3, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:n_groups] * 10.0
    x = np.concatenate([c + 0.1 * rng.normal(size=(n_per, dim)) for c in centres])
    groups = np.repeat([f"g{i}" for i in range(n_groups)], n_per)
    return x, groups


def test_cosine_distances_match_scipy():
    x = np.random.default_rng(1).normal(size=(7, 5))
    np.testing.assert_allclose(cosine_distances(x), cdist(x, x, "cosine"), atol=1e-12)


def test_perfectly_separated_groups():
    x, g = _separated()
    m = token_metrics(x, g)
    assert m["one_nn_acc"] == 1.0
    assert m["centroid_acc"] == 1.0
    assert m["within_cos"] < m["between_cos"]
    assert m["n_slides"] == 12 and m["n_groups"] == 3
    # chance: 3 same-group others out of 11
    assert m["chance_1nn"] == pytest.approx(3 / 11)
    assert m["chance_majority"] == pytest.approx(1 / 3)


def test_within_between_against_scipy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 6))
    g = np.array(list("aaabbbccc"))
    d = cdist(x, x, "cosine")
    iu = np.triu_indices(9, 1)
    same = (g[:, None] == g[None, :])[iu]
    m = token_metrics(x, g)
    assert m["within_cos"] == pytest.approx(d[iu][same].mean())
    assert m["between_cos"] == pytest.approx(d[iu][~same].mean())


def test_one_nn_and_centroid_by_hand():
    # Slide 2 sits next to group "a" but belongs to "b": 1-NN wrong for it, right for the others.
    x = np.array([[1.0, 0.0], [1.0, 0.05], [1.0, 0.2], [0.0, 1.0], [0.05, 1.0]])
    g = ["a", "a", "b", "b", "b"]
    m = token_metrics(x, g)
    # nn: 0->1 (a,a ok), 1->0 ok, 2->1 (b vs a wrong), 3->4 ok, 4->3 ok
    assert m["one_nn_acc"] == pytest.approx(4 / 5)
    assert 0.0 <= m["centroid_acc"] <= 1.0
    assert "patient" in format_token_table({"patient": m})


def test_bad_inputs():
    with pytest.raises(ValueError):
        token_metrics(np.zeros((1, 3)) + 1, ["a"])
    with pytest.raises(ValueError):
        token_metrics(np.ones((3, 2)), ["a", "b"])
    with pytest.raises(ValueError):
        cosine_distances(np.zeros((2, 3)))


def _centroid_acc_loop(x, g):
    """Leave-one-out nearest-centroid accuracy, one slide and one group at a time (the reference)."""
    x, g = np.asarray(x, dtype=np.float64), np.asarray(g)
    correct = []
    for i in range(len(g)):
        best, best_d = None, np.inf
        for lab in np.unique(g):
            members = (np.arange(len(g)) != i) & (g == lab)
            if members.any():
                c = x[members].mean(axis=0)
                d = 1.0 - x[i] @ c / (np.linalg.norm(x[i]) * np.linalg.norm(c))
                if d < best_d:
                    best, best_d = lab, d
        correct.append(best == g[i])
    return float(np.mean(correct))


@pytest.mark.parametrize("seed", range(5))
def test_centroid_accuracy_matches_a_loop(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(11, 4)) + np.repeat(rng.normal(size=(4, 4)), [3, 3, 4, 1], axis=0)
    g = np.repeat(["a", "b", "c", "d"], [3, 3, 4, 1])  # "d" is a singleton: never a candidate for itself
    assert token_metrics(x, g)["centroid_acc"] == pytest.approx(_centroid_acc_loop(x, g))
