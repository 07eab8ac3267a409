"""Synthetic cohort: determinism, geometry, counts, file round trip, learnable signal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from hist_st.data.synthetic import ENCODER, GRIDS, cohort_params, make_cohort, make_slide
from hist_st.metrics import per_gene_metrics
from hist_st.slide import read_prepared


def test_same_seed_identical_different_seed_differs():
    a = make_slide("s0", 400, "hex", seed=3, n_genes=30, embed_dim=16)
    b = make_slide("s0", 400, "hex", seed=3, n_genes=30, embed_dim=16)
    c = make_slide("s0", 400, "hex", seed=4, n_genes=30, embed_dim=16)
    np.testing.assert_array_equal(a.spatial, b.spatial)
    np.testing.assert_array_equal(a.counts.toarray(), b.counts.toarray())
    np.testing.assert_array_equal(a.embeddings[ENCODER], b.embeddings[ENCODER])
    assert list(a.barcodes) == list(b.barcodes)
    assert a.spatial.shape != c.spatial.shape or not np.array_equal(a.spatial, c.spatial)
    assert not np.array_equal(a.embeddings[ENCODER][:10], c.embeddings[ENCODER][:10])


@pytest.mark.parametrize("grid,n", [("hex", 300), ("hex", 5000), ("square", 300), ("square", 2500)])
def test_spot_count_geometry_and_counts(grid: str, n: int):
    s = make_slide(f"g{n}", n, grid, seed=n, n_genes=20, embed_dim=8)
    geo = GRIDS[grid]
    assert abs(s.n_spots - n) <= 0.1 * n
    assert s.technology == geo["technology"] and s.lattice_unit_um == geo["lattice_unit_um"]
    assert (s.spatial >= 0).all()
    assert np.unique(s.spatial, axis=0).shape[0] == s.n_spots
    assert len(set(s.barcodes)) == s.n_spots
    # nearest-neighbour distance equals the pitch (hex: 100 um, square: 200 um)
    um = s.spatial * s.um_per_px
    d, _ = cKDTree(um).query(um, k=2)
    np.testing.assert_allclose(d[:, 1].min(), geo["spot_pitch_um"], rtol=1e-9)
    np.testing.assert_allclose(np.median(d[:, 1]), geo["spot_pitch_um"], rtol=1e-9)
    # hex: six neighbours at the pitch for interior spots; square: four
    k_max = 6 if grid == "hex" else 4
    nb = cKDTree(um).query_ball_point(um, r=geo["spot_pitch_um"] * 1.01, return_length=True) - 1
    assert nb.max() == k_max
    # counts: CSR float32, non-negative integers
    assert s.counts.format == "csr" and s.counts.dtype == np.float32
    data = s.counts.data
    assert (data >= 0).all() and np.array_equal(data, np.round(data))
    assert s.embeddings[ENCODER].shape == (s.n_spots, 8)
    if s.lattice is not None:
        assert np.unique(s.lattice, axis=0).shape[0] == s.n_spots


@pytest.mark.parametrize("grid,seed", [("hex", 0), ("hex", 1), ("square", 2)])
def test_tissue_has_holes(grid: str, seed: int):
    s = make_slide("h", 3000, grid, seed=seed, n_genes=5, embed_dim=4)
    rc = s.array_coords
    col = rc[:, 1] // 2 if grid == "hex" else rc[:, 1]  # hex: one site per two columns per row
    occ = np.zeros((rc[:, 0].max() + 1, col.max() + 1), dtype=bool)
    occ[rc[:, 0], col] = True
    enclosed_empty = ndimage.binary_fill_holes(occ) & ~occ
    assert enclosed_empty.sum() >= 3


def test_roundtrip_prepared(tmp_path):
    from hist_st.slide import write_prepared

    s = make_slide("rt", 500, "square", seed=7, n_genes=25, embed_dim=12, patient="P9")
    r = read_prepared(write_prepared(s, tmp_path / "rt.h5ad"))
    np.testing.assert_array_equal(r.spatial, s.spatial)
    np.testing.assert_array_equal(r.counts.toarray(), s.counts.toarray())
    np.testing.assert_array_equal(r.embeddings[ENCODER], s.embeddings[ENCODER])
    np.testing.assert_array_equal(r.array_coords, s.array_coords)
    assert list(r.genes) == list(s.genes) and list(r.barcodes) == list(s.barcodes)
    assert (r.patient, r.technology, r.spot_pitch_um) == ("P9", "st", 200.0)
    assert r.meta["seed"] == 7


def test_make_cohort_manifest(tmp_path):
    path = make_cohort(tmp_path / "c", n_slides=4, n_spots=(200, 400), n_genes=40, embed_dim=8, seed=1)
    man = json.loads(path.read_text())
    assert man["slide_ids"] == ["syn00", "syn01", "syn02", "syn03"]
    assert set(man["technology"].values()) == {"visium", "st"}
    assert sorted(man["hvg"]) == sorted(man["genes"]) == sorted(man["highly_expressed"])
    assert man["hvg"] != man["highly_expressed"]
    assert man["encoders"] == ["synthetic"] and man["embedding_dims"] == {"synthetic": 8}
    assert man["patients"] == {"syn00": "P0", "syn01": "P0", "syn02": "P1", "syn03": "P1"}
    for entry in man["slides"]:
        s = read_prepared(tmp_path / "c" / entry["file"])
        assert s.n_spots == entry["n_spots"] and s.patient == entry["patient"]
    assert not list((tmp_path / "c").glob(".*tmp"))


def test_signal_is_learnable_per_spot():
    from sklearn.linear_model import Ridge

    params = cohort_params(0, n_genes=60, embed_dim=32)
    slides = [
        make_slide(f"s{i}", 800, "hex", seed=i, n_genes=60, embed_dim=32, patient=f"P{i}", params=params)
        for i in range(4)
    ]
    x = np.concatenate([s.embeddings[ENCODER] for s in slides[:3]])
    y = np.concatenate([np.log1p(s.counts.toarray()) for s in slides[:3]])
    model = Ridge(alpha=1.0).fit(x, y)
    test = slides[3]
    m = per_gene_metrics(model.predict(test.embeddings[ENCODER]), test.counts)
    assert m["pcc"] > 0.05
