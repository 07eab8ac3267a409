"""Metrics: both protocols against independent scipy / sklearn computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr
from sklearn.metrics import r2_score

from hist_st.metrics import (
    STD_DDOF,
    evaluate_fold,
    format_table,
    map_metrics,
    normalise_counts,
    per_gene_metrics,
    pooled_metrics,
    summarise_folds,
)


def _pair(rng: np.random.Generator, n: int = 60, g: int = 12) -> tuple[np.ndarray, np.ndarray]:
    counts = rng.poisson(rng.gamma(2.0, 3.0, size=g), size=(n, g)).astype(np.float32)
    pred = np.log1p(counts) + rng.normal(0, 0.5, size=(n, g))
    return pred, counts


def test_pooled_matches_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    pred, counts = _pair(rng)
    m = pooled_metrics(pred, counts)
    pc = np.maximum(np.expm1(pred), 0).ravel()
    assert m["r2"] == pytest.approx(r2_score(counts.ravel(), pc), rel=1e-9)
    assert m["pcc"] == pytest.approx(pearsonr(pc, counts.ravel())[0], rel=1e-9)
    # sparse truth gives the same numbers
    assert pooled_metrics(pred, sp.csr_matrix(counts)) == pytest.approx(m)


def test_per_gene_matches_loop_and_excludes_constant_genes():
    rng = np.random.default_rng(1)
    pred, counts = _pair(rng)
    counts[:, 3] = 0.0  # constant (all zero)
    counts[:, 7] = 5.0  # constant non-zero
    pred[:, 9] = 0.7  # constant prediction on a varying gene
    m = per_gene_metrics(pred, sp.csr_matrix(counts))
    assert m["n_excluded_constant"] == 2
    assert m["excluded_genes"].tolist() == [3, 7]
    assert m["n_evaluated"] == counts.shape[1] - 2
    assert m["n_constant_pred"] == 1
    y = np.log1p(counts.astype(np.float64))
    pccs, r2s = [], []
    for j in range(counts.shape[1]):
        if j in (3, 7):
            assert np.isnan(m["pcc_per_gene"][j]) and np.isnan(m["r2_per_gene"][j])
            continue
        r = 0.0 if j == 9 else pearsonr(pred[:, j], y[:, j])[0]
        r2 = r2_score(y[:, j], pred[:, j])
        assert m["pcc_per_gene"][j] == pytest.approx(r, abs=1e-9)
        assert m["r2_per_gene"][j] == pytest.approx(r2, abs=1e-9)
        pccs.append(r)
        r2s.append(r2)
    assert m["pcc"] == pytest.approx(np.mean(pccs))
    assert m["r2"] == pytest.approx(np.mean(r2s))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        pooled_metrics(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="does not match"):
        per_gene_metrics(np.zeros((3, 4)), sp.csr_matrix((4, 4)))
    with pytest.raises(ValueError, match="slides differ"):
        evaluate_fold({"a": np.zeros((2, 2))}, {"b": np.zeros((2, 2))})


def test_evaluate_fold_pools_per_slide_and_concatenates_per_gene():
    rng = np.random.default_rng(2)
    preds, truths = {}, {}
    for sid, n in (("s2", 40), ("s1", 55)):
        p, c = _pair(rng, n=n)
        preds[sid], truths[sid] = p, sp.csr_matrix(c)
    res = evaluate_fold(preds, truths)
    assert res["slides"] == ["s1", "s2"]
    per = [pooled_metrics(preds[s], truths[s]) for s in ("s1", "s2")]
    assert res["pooled"]["r2"] == pytest.approx(np.mean([m["r2"] for m in per]))
    assert res["pooled"]["pcc"] == pytest.approx(np.mean([m["pcc"] for m in per]))
    cat = per_gene_metrics(
        np.concatenate([preds["s1"], preds["s2"]]),
        np.concatenate([truths["s1"].toarray(), truths["s2"].toarray()]),
    )
    assert res["per_gene"]["pcc"] == pytest.approx(cat["pcc"])
    np.testing.assert_allclose(res["per_gene"]["r2_per_gene"], cat["r2_per_gene"])
    assert res["n_spots"] == 95
    maps = [map_metrics(preds[s], truths[s])["pcc"] for s in ("s1", "s2")]
    assert res["maps"]["pcc"] == pytest.approx(np.mean(maps))
    assert [res["per_slide"][s]["map_pcc"] for s in ("s1", "s2")] == pytest.approx(maps)


def test_map_metrics_matches_scanpy_normalisation_and_scipy():
    import anndata as ad
    import scanpy as sc

    rng = np.random.default_rng(4)
    pred, counts = _pair(rng, n=50, g=10)
    counts[:, 3] = 0.0  # a gene never detected on the slide: excluded
    pred[:7, 5] = -0.3  # negative log1p predictions: expm1 < 0 counts as 0
    m = map_metrics(pred, sp.csr_matrix(counts))

    def scanpy_maps(x: np.ndarray) -> np.ndarray:
        a = ad.AnnData(np.maximum(x, 0.0).astype(np.float64))
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        return np.asarray(a.X)

    p_ref, m_ref = scanpy_maps(np.expm1(pred)), scanpy_maps(counts)
    np.testing.assert_allclose(normalise_counts(counts), m_ref, rtol=1e-12)
    ref = [pearsonr(p_ref[:, j], m_ref[:, j])[0] for j in range(10) if j != 3]
    assert m["n_evaluated"] == 9 and m["pcc"] == pytest.approx(np.mean(ref), rel=1e-9)


def test_map_metrics_divides_out_library_size():
    rng = np.random.default_rng(5)
    _, counts = _pair(rng, n=80, g=8)
    counts += 1.0  # every spot and gene detected: normalisation is exact
    depth = rng.uniform(0.3, 3.0, size=(80, 1))
    # the truth at another library size per spot: perfect maps, imperfect log1p counts
    rescaled = np.log1p(counts * depth)
    assert map_metrics(rescaled, counts)["pcc"] == pytest.approx(1.0)
    assert per_gene_metrics(rescaled, counts)["pcc"] < 0.95
    # library size alone (every gene at its mean times the spot's depth): it scores on log1p counts only
    depth_only = np.log1p(counts.mean(0) * counts.sum(1, keepdims=True) / counts.sum(1).mean())
    assert per_gene_metrics(depth_only, counts)["pcc"] > 0.3
    assert map_metrics(depth_only, counts)["pcc"] == pytest.approx(0.0, abs=1e-6)
    assert normalise_counts(np.zeros((2, 3))).tolist() == [[0.0] * 3] * 2  # empty spots stay 0


def test_summarise_folds_std_and_table():
    folds = [
        {"pooled": {"r2": r, "pcc": r + 0.1}, "per_gene": {"pcc": r / 2, "r2": r - 0.5}}
        for r in (0.2, 0.4, 0.35, 0.1)
    ]
    s = summarise_folds(folds)
    vals = np.array([0.2, 0.4, 0.35, 0.1])
    assert STD_DDOF == 0 and s["ddof"] == 0
    assert s["pooled"]["r2"]["mean"] == pytest.approx(vals.mean())
    assert s["pooled"]["r2"]["std"] == pytest.approx(np.std(vals))  # numpy default ddof=0
    assert s["per_gene"]["pcc"]["std"] == pytest.approx(np.std(vals / 2))
    table = format_table({"HiST": s, "ridge": s})
    lines = table.splitlines()
    assert lines[0] == "| Method | pooled R2 | pooled PCC | per-gene PCC | per-gene R2 | map PCC |"
    assert len(lines) == 4 and lines[2].startswith("| HiST | 0.263 ± ")
    assert "maps" not in s and lines[2].endswith(" | — |")  # records written before the maps protocol
    s_maps = summarise_folds([{**f, "maps": {"pcc": 0.1 * (i + 1)}} for i, f in enumerate(folds)])
    assert s_maps["maps"]["pcc"]["mean"] == pytest.approx(0.25)
    assert format_table({"HiST": s_maps}).splitlines()[2].endswith(" | 0.250 ± 0.112 |")
    with pytest.raises(ValueError):
        summarise_folds([])
