"""Gene-name harmonisation, duplicate summing, shared genes and rankings."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from hist_st.harmonise import (
    clean_gene_names,
    harmonise_slide,
    load_gene_mapping,
    rank_highly_expressed,
    rank_hvg,
    restrict_genes,
    shared_genes,
)
from hist_st.slide import Slide


def test_clean_names():
    names = [
        "GRCh38_ACTB",
        "hg19-GAPDH",
        "ENSG00000141510.16",
        "mm10___Actb",
        "MT-CO1",
        "HLA-A",
        "ENSG00000075624",
    ]
    assert clean_gene_names(names).tolist() == [
        "ACTB",
        "GAPDH",
        "ENSG00000141510",
        "Actb",
        "MT-CO1",
        "HLA-A",
        "ENSG00000075624",
    ]


def test_harmonise_slide_maps_and_sums(tmp_path):
    mapping_file = tmp_path / "map.tsv"
    mapping_file.write_text("ENSG00000141510.3\tTP53\nENSG00000075624\tACTB\n")
    mapping = load_gene_mapping(mapping_file)
    genes = np.array(
        ["GRCh38_ENSG00000141510.16", "TP53", "ENSG00000075624", "X1", "ENSG00000000001"], dtype=object
    )
    counts = sp.csr_matrix(np.array([[1, 2, 3, 4, 5], [0, 1, 0, 1, 0], [7, 0, 0, 0, 1]], np.float32))
    s = Slide(
        "s", np.array([[0.0, 0], [1, 0], [0, 1]]), np.array(["a", "b", "a"], dtype=object), genes, counts
    )
    harmonise_slide(s, symbols=None, mapping=mapping)
    assert s.genes.tolist() == ["TP53", "ACTB", "X1", "ENSG00000000001"]
    # duplicate gene TP53 summed, duplicate barcode "a" summed (rows 0 and 2)
    np.testing.assert_array_equal(s.counts.toarray(), [[1 + 2 + 7, 3, 4, 6], [1, 0, 1, 0]])
    assert s.barcodes.tolist() == ["a", "b"] and s.spatial.shape == (2, 2)
    s.validate()


def test_symbol_column_wins():
    genes = ["ENSG00000141510", "ENSG00000075624"]
    counts = sp.csr_matrix(np.ones((2, 2), np.float32))
    s = Slide(
        "s",
        np.array([[0.0, 0], [1, 0]]),
        np.array(["a", "b"], dtype=object),
        np.array(genes, dtype=object),
        counts,
    )
    harmonise_slide(s, symbols=["TP53", ""])
    assert s.genes.tolist() == ["TP53", "ENSG00000075624"]


def test_shared_and_rankings():
    import anndata as ad
    import scanpy as sc

    assert shared_genes([["a", "b", "c"], ["c", "a"], ["a", "c", "d"]]) == ["a", "c"]
    rng = np.random.default_rng(0)
    n, g = 300, 200
    means = rng.gamma(0.8, 4.0, size=g)
    disp = rng.gamma(2.0, 0.5, size=g)  # negative binomial: gene-specific overdispersion
    x = rng.negative_binomial(1 / disp, 1 / (1 + means * disp), size=(n, g)).astype(np.float32)
    genes = [f"g{i}" for i in range(g)]
    mats = [sp.csr_matrix(x[:150]), sp.csr_matrix(x[150:])]
    hvg = rank_hvg(mats, genes)
    assert sorted(hvg) == sorted(genes)
    # the top k agree with scanpy's own seurat-flavour selection on normalize_total + log1p
    a = ad.AnnData(x.copy())
    a.var_names = genes
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=50)
    assert set(hvg[:50]) == set(a.var_names[a.var["highly_variable"]])
    he = rank_highly_expressed(mats, genes)
    assert he[0] == genes[int(np.argmax(np.log1p(x / x.sum(1, keepdims=True) * 1e4).mean(0)))]
    s = Slide(
        "s",
        rng.random((n, 2)) * 100,
        np.array([str(i) for i in range(n)], dtype=object),
        np.array(genes, dtype=object),
        sp.csr_matrix(x),
    )
    restrict_genes(s, ["g5", "g0"])
    np.testing.assert_array_equal(s.counts.toarray(), x[:, [5, 0]])
