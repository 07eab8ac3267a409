"""Per-gene scores by expression level: the level equals scanpy's, the table equals brute-force means."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from hist_st.evaluate.strata import expression_level, per_gene_by_level
from hist_st.slide import Slide


def _slide(slide_id: str, seed: int, genes: list[str]) -> Slide:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.5, 4.0, size=(30, len(genes)))).astype(np.float32)
    counts[3] = 0  # an empty spot: normalised to zeros, as scanpy leaves it
    return Slide(slide_id=slide_id, spatial=rng.uniform(0, 1e3, size=(30, 2)),
                 barcodes=np.array([f"{slide_id}-{i}" for i in range(30)], dtype=object),
                 genes=np.array(genes, dtype=object), counts=sp.csr_matrix(counts), um_per_px=1.0).validate()


@pytest.mark.filterwarnings("ignore:Some cells have zero counts")
def test_expression_level_is_scanpys_normalised_log1p_mean_over_every_spot():
    import scanpy as sc

    genes = [f"G{i}" for i in range(9)]
    slides = [_slide("a", 1, genes), _slide("b", 2, genes[::-1])]  # the second stores genes in another order
    picked = ["G4", "G0", "G8"]
    adatas = []
    for s in slides:
        a = ad.AnnData(X=s.counts.toarray(), var={"gene": list(s.genes)})
        a.var_names = list(s.genes)
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        adatas.append(a[:, picked].X)
    expected = np.concatenate(adatas).mean(axis=0)
    np.testing.assert_allclose(expression_level(slides, picked), expected, rtol=1e-6)


def test_per_gene_by_level_takes_means_of_every_fold_and_gene_in_each_fifth():
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(23)]
    level = rng.uniform(size=len(genes))
    rows = []
    values = {}
    for method in ("HiST", "bleep"):
        for g in genes:
            row = {"method": method, "gene": g}
            for fold in range(3):
                v = None if (method, g, fold) == ("bleep", "G5", 1) else float(rng.normal())  # a constant gene
                row[f"pcc_fold{fold}"], row[f"r2_fold{fold}"] = v, 0.0
                if v is not None:
                    values.setdefault(method, {}).setdefault(g, []).append(v)
            rows.append(row)
    table = per_gene_by_level(rows, genes, level, methods=["bleep", "HiST"])
    lines = table.splitlines()
    assert lines[0].endswith("| bleep | HiST |")
    order = np.argsort(level)
    sizes = [len(g) for g in np.array_split(order, 5)]
    assert sizes == [5, 5, 5, 4, 4]
    start = 0
    for k, size in enumerate(sizes):
        idx = order[start:start + size]
        start += size
        cells = lines[2 + k].split(" | ")
        assert int(cells[1]) == size
        lo, hi = map(float, re.search(r": ([\d.]+)-([\d.]+)", cells[0]).groups())
        assert (lo, hi) == (round(level[idx].min(), 3), round(level[idx].max(), 3))
        for col, method in ((2, "bleep"), (3, "HiST")):
            expected = np.mean([v for i in idx for v in values[method][genes[i]]])
            assert float(cells[col].strip(" |")) == round(expected, 3)
    last = lines[-1].split(" | ")
    assert last[0] == "| all" and int(last[1]) == len(genes)
    assert float(last[2]) == round(np.mean([v for g in genes for v in values["bleep"][g]]), 3)
