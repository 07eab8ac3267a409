"""Cross-slide harmonisation of gene spaces (paper A.1) and cohort gene rankings.

Steps: strip dataset-specific prefixes (``GRCh38_``, ``hg19-``, ...) and Ensembl version suffixes
(``ENSG00000141510.16`` -> ``ENSG00000141510``); map Ensembl ids to symbols when a symbol column or a
user mapping file is available; sum duplicated genes and barcodes; restrict to the genes shared by the
slides involved; rank genes by dispersion (highly variable genes, scanpy ``seurat`` flavour on
``normalize_total(1e4)`` + ``log1p``) and by mean expression (highly expressed genes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.slide import Slide

__all__ = [
    "clean_gene_names",
    "load_gene_mapping",
    "map_gene_ids",
    "sum_duplicate_genes",
    "sum_duplicate_barcodes",
    "harmonise_slide",
    "shared_genes",
    "restrict_genes",
    "log_normalised",
    "rank_hvg",
    "rank_highly_expressed",
    "rank_hest_bench",
    "HEST_BENCH_METHOD",
]


_PREFIX = re.compile(r"^(?:GRCh\d+|GRCm\d+|hg\d+|mm\d+|hs|Hs|human|mouse|HUMAN|MOUSE)[_\-.:]+", re.IGNORECASE)
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GTP]\d{6,})\.\d+$")
_ENSEMBL = re.compile(r"^ENS[A-Z]*[GTP]\d{6,}$")


def clean_gene_names(names: Iterable[str]) -> np.ndarray:
    """Strip genome prefixes (``GRCh38_``, ``hg19-``, ``mm10_``, ...) and Ensembl version suffixes.

    Returns:
        object array of cleaned names, same length and order.
    """
    out = []
    for n in names:
        n = str(n).strip()
        m = _PREFIX.match(n)
        if m and len(n) > m.end():
            n = n[m.end() :]
        n = _ENSEMBL_VERSION.sub(r"\1", n)
        out.append(n)
    return np.asarray(out, dtype=object)


def is_ensembl(name: str) -> bool:
    return bool(_ENSEMBL.match(str(name)))


def load_gene_mapping(path: str | Path) -> dict[str, str]:
    """Read an Ensembl-id -> symbol mapping: CSV/TSV with two columns (id, symbol), header optional."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "gene mapping file not found")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(path, sep=sep, header=None, dtype=str, comment="#")
    except Exception as exc:
        raise InputError(path, f"cannot read the gene mapping ({exc})") from exc
    if df.shape[1] < 2:
        raise InputError(path, "the gene mapping needs two columns: Ensembl id, symbol")
    ids = clean_gene_names(df.iloc[:, 0].fillna(""))
    syms = df.iloc[:, 1].fillna("").astype(str).str.strip()
    mapping = {i: s for i, s in zip(ids, syms) if is_ensembl(i) and s}
    if not mapping:
        raise InputError(path, "no Ensembl id -> symbol rows found")
    return mapping


def map_gene_ids(
    genes: Sequence[str], symbols: Sequence[str] | None = None, mapping: Mapping[str, str] | None = None
) -> np.ndarray:
    """Replace Ensembl ids by symbols from a per-gene ``symbols`` column and/or a ``mapping``.

    Ids without a symbol keep their (cleaned) id, so no gene is lost.
    """
    genes = clean_gene_names(genes)
    out = genes.copy()
    for i, g in enumerate(genes):
        if not is_ensembl(g):
            continue
        sym = None
        if symbols is not None:
            s = str(symbols[i]).strip()
            if s and s.lower() != "nan" and not is_ensembl(s):
                sym = (
                    _PREFIX.sub("", s) if _PREFIX.match(s) and len(s) > len(_PREFIX.match(s).group(0)) else s
                )
        if sym is None and mapping is not None:
            sym = mapping.get(g)
        if sym:
            out[i] = sym
    return out


def sum_duplicate_genes(counts: sp.csr_matrix, genes: Sequence[str]) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sum columns that share a gene name; keeps first-occurrence order.

    Args:
        counts: ``[N, G]`` counts.
        genes: ``[G]`` names.

    Returns:
        ``(counts [N, G'], genes [G'])``.
    """
    genes = np.asarray(genes, dtype=object)
    uniq, first, inverse = np.unique(genes, return_index=True, return_inverse=True)
    if len(uniq) == len(genes):
        return sp.csr_matrix(counts, dtype=np.float32), genes
    order = np.argsort(first)  # unique ids in first-occurrence order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    col = rank[inverse]
    agg = sp.csr_matrix(
        (np.ones(len(genes), np.float32), (np.arange(len(genes)), col)), shape=(len(genes), len(uniq))
    )
    return sp.csr_matrix(sp.csr_matrix(counts, dtype=np.float32) @ agg), uniq[order]


def sum_duplicate_barcodes(slide: Slide) -> Slide:
    """Merge spots with the same barcode: counts summed, first occurrence's coordinates kept."""
    bc = np.asarray([str(b) for b in slide.barcodes], dtype=object)
    uniq, first, inverse = np.unique(bc, return_index=True, return_inverse=True)
    if len(uniq) == len(bc):
        return slide
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    row = rank[inverse]
    keep = first[order]
    agg = sp.csr_matrix((np.ones(len(bc), np.float32), (row, np.arange(len(bc)))), shape=(len(uniq), len(bc)))
    counts = sp.csr_matrix(agg @ slide.counts) if slide.counts is not None else None
    slide.take_spots(keep)
    slide.counts = counts
    slide.meta["duplicate_barcodes_summed"] = int(len(bc) - len(uniq))
    return slide


def harmonise_slide(
    slide: Slide, symbols: Sequence[str] | None = None, mapping: Mapping[str, str] | None = None
) -> Slide:
    """Clean gene names, map Ensembl ids to symbols, sum duplicated genes and barcodes (in place).

    Args:
        slide: A slide with counts.
        symbols: Optional per-gene symbol column aligned with ``slide.genes``.
        mapping: Optional Ensembl id -> symbol mapping.
    """
    if slide.counts is None:
        return slide
    n_before = len(slide.genes)
    genes = map_gene_ids(slide.genes, symbols, mapping)
    if slide.var is not None:  # annotations of the first occurrence of each (mapped) gene
        _, first = np.unique(np.asarray(genes, dtype=object), return_index=True)
        slide.var = slide.var.iloc[np.sort(first)]
    slide.counts, slide.genes = sum_duplicate_genes(slide.counts, genes)
    if slide.var is not None:
        slide.var = slide.var.set_axis([str(g) for g in slide.genes], axis=0)
    slide.meta["genes_before_harmonisation"] = int(n_before)
    slide.meta["duplicate_genes_summed"] = int(n_before - len(slide.genes))
    return sum_duplicate_barcodes(slide)


def shared_genes(gene_lists: Iterable[Sequence[str]]) -> list[str]:
    """Genes present in every list, in the order of the first list."""
    lists = [list(map(str, g)) for g in gene_lists]
    if not lists:
        return []
    common = set(lists[0])
    for g in lists[1:]:
        common &= set(g)
    return [g for g in lists[0] if g in common]


def restrict_genes(slide: Slide, genes: Sequence[str]) -> Slide:
    """Reindex ``slide`` (in place) to exactly ``genes`` (all must be present)."""
    index = {str(g): i for i, g in enumerate(slide.genes)}
    missing = [g for g in genes if g not in index]
    if missing:
        raise InputError(
            f"slide {slide.slide_id!r}", f"{len(missing)} shared genes are missing (first: {missing[:3]})"
        )
    cols = np.asarray([index[g] for g in genes], dtype=np.int64)
    if slide.counts is not None:
        slide.counts = sp.csr_matrix(slide.counts[:, cols])
    if slide.var is not None:
        slide.var = slide.var.iloc[cols]
    slide.genes = np.asarray(list(genes), dtype=object)
    return slide


def log_normalised(counts: sp.spmatrix | np.ndarray, dtype: Any = np.float32) -> sp.csr_matrix:
    """``log1p(counts / spot total * 1e4)`` (scanpy's ``normalize_total(1e4)`` + ``log1p``) of a count matrix
    ``[N, G]``, totals over its own columns; an empty spot stays zero."""
    x = sp.csr_matrix(counts, dtype=dtype)
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    x = sp.csr_matrix(sp.diags(scale.astype(dtype)) @ x)
    x.data = np.log1p(x.data)
    return x


def _stack_log_normalised(mats: Sequence[sp.spmatrix]) -> sp.csr_matrix:
    return log_normalised(sp.vstack([sp.csr_matrix(m, dtype=np.float32) for m in mats]).tocsr())


def rank_hvg(mats: Sequence[sp.spmatrix], genes: Sequence[str]) -> list[str]:
    """Rank ``genes`` by normalised dispersion (scanpy ``seurat`` flavour) over the stacked spots.

    Args:
        mats: Count matrices ``[N_i, G]`` over the same ``genes`` (one per slide in scope).
        genes: ``[G]`` gene names.

    Returns:
        All G genes, most variable first (genes with undefined dispersion, e.g. all-zero, last).
    """
    import anndata as ad
    import scanpy as sc

    genes = list(map(str, genes))
    if not genes:
        return []
    x = _stack_log_normalised(mats)
    adata = ad.AnnData(X=x)
    adata.var_names = genes
    adata.uns["log1p"] = {"base": None}
    sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=None, inplace=True)
    disp = adata.var["dispersions_norm"].to_numpy(dtype=np.float64)
    disp = np.where(np.isfinite(disp), disp, -np.inf)
    order = np.lexsort((np.arange(len(genes)), -disp))  # descending dispersion, ties by input order
    return [genes[i] for i in order]


def rank_highly_expressed(mats: Sequence[sp.spmatrix], genes: Sequence[str]) -> list[str]:
    """Rank ``genes`` by mean ``log1p(normalize_total(1e4))`` expression, highest first."""
    genes = list(map(str, genes))
    if not genes:
        return []
    x = _stack_log_normalised(mats)
    mean = np.asarray(x.mean(axis=0)).ravel()
    order = np.lexsort((np.arange(len(genes)), -mean))
    return [genes[i] for i in order]


HEST_BENCH_METHOD = (
    "HEST-Benchmark get_k_genes(criteria='var'): genes detected in >= ceil(10% of spots) of every slide, "
    "names containing BLANK or Control dropped, scanpy highly_variable_genes(flavor='seurat', n_top_genes=k) "
    "on log1p of the stacked raw counts (no normalize_total), kept in sorted gene-name order"
)


def rank_hest_bench(mats: Sequence[sp.spmatrix], genes: Sequence[str], k: int = 50) -> list[str]:
    """HEST-Benchmark's gene set: its ``get_k_genes(adata_list, k, criteria="var")``, step by step.

    1. per slide, keep genes with a non-zero count in at least ``ceil(0.1 * n_spots)`` spots, and
       intersect over slides (sorted, as ``np.intersect1d`` does);
    2. drop names containing ``"BLANK"`` or ``"Control"`` (Xenium probes);
    3. stack the raw counts of every slide (float32), ``log1p`` (no library-size normalisation);
    4. scanpy ``highly_variable_genes(n_top_genes=k)`` (flavour ``seurat``) and keep the selected genes in
       the sorted order of step 1 (HEST takes ``var_names[highly_variable][:k]``, not ranked order).

    Args:
        mats: Raw count matrices ``[N_i, G]`` over the same ``genes``, one per slide of the task.
        genes: ``[G]`` gene names.
        k: Number of genes (HEST-Benchmark: 50).

    Returns:
        Up to ``k`` gene names in sorted order.
    """
    import anndata as ad
    import scanpy as sc

    genes = np.asarray(list(map(str, genes)), dtype=object)
    if len(genes) == 0 or not mats:
        return []
    keep = np.ones(len(genes), dtype=bool)
    for m in mats:
        m = sp.csr_matrix(m)
        detected = np.asarray((m > 0).sum(axis=0)).ravel()
        keep &= detected >= np.ceil(0.1 * m.shape[0])
    order = np.argsort(genes[keep].astype(str), kind="stable")
    cols = np.flatnonzero(keep)[order]
    cols = np.asarray([c for c in cols if "BLANK" not in genes[c] and "Control" not in genes[c]], dtype=np.int64)
    if len(cols) == 0:
        return []
    x = sp.csr_matrix(sp.vstack([sp.csr_matrix(m)[:, cols] for m in mats]), dtype=np.float32)
    x.data = np.log1p(x.data)
    adata = ad.AnnData(X=x)
    adata.var_names = [str(g) for g in genes[cols]]
    adata.uns["log1p"] = {"base": None}
    sc.pp.highly_variable_genes(adata, n_top_genes=min(k, len(cols)), flavor="seurat")
    return [str(g) for g in adata.var_names[adata.var["highly_variable"].to_numpy()][:k]]
