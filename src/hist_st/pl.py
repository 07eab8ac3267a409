"""Expression maps a pathologist can read: spots of their real size over the H&E, library-size normalised.

Raw predicted counts mostly show library size (how much RNA a spot yields), so every gene's map looks
alike. Maps therefore default to ``log1p`` of counts per 10,000 over the model's genes (scanpy's
``normalize_total(target_sum=1e4)`` + ``log1p``), and each figure says which values it shows.

```python
from hist_st.pl import plot_genes
plot_genes("runs/pred/C5.h5ad", ["ERBB2", "IGKC"], "C5_maps.png")                 # measured vs predicted
plot_genes("runs/pred_he/slide.h5ad", ["ERBB2"], "maps.png", values="log1p")       # image-only prediction
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.metrics import normalise_counts, pearson
from hist_st.slide import Slide, read_prepared

__all__ = ["VALUES", "normalise_counts", "gene_values", "spot_diameter_px", "map_agreement", "pc1_share",
           "plot_genes", "draw_spots", "pyplot", "save_figure"]

#: What a map shows: library-size-normalised log expression (default), log1p counts, or counts.
VALUES = {
    "normalised": "log1p(counts per 10k over the model's genes)",
    "log1p": "log1p(counts)",
    "counts": "counts",
}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: float | None = None) -> Path:
    """Write ``fig`` to ``path`` (parents created, tight bounding box, ``dpi``: the figure's own when None) and
    close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def gene_values(counts: np.ndarray | sp.spmatrix, columns: Sequence[int], values: str = "normalised") -> np.ndarray:
    """The map values of ``columns`` of ``counts`` ``[N, G]`` (normalised over all G genes); ``[N, len(columns)]``."""
    if values not in VALUES:
        raise InputError("--values", f"unknown values {values!r}; use {', '.join(VALUES)}")
    cols = list(columns)
    if values == "normalised":
        return normalise_counts(counts)[:, cols]
    x = counts[:, cols]
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    return np.log1p(x) if values == "log1p" else x


def spot_diameter_px(slide: Slide) -> float:
    """Spot diameter in full-resolution pixels: 10x's ``spot_diameter_fullres`` when known, else half the pitch."""
    d = slide.scalefactors.get("spot_diameter_fullres")
    if d:
        return float(d)
    if slide.spot_pitch_um and slide.um_per_px:
        return 0.5 * float(slide.spot_pitch_um) / float(slide.um_per_px)
    from scipy.spatial import cKDTree

    xy = np.asarray(slide.spatial, dtype=np.float64)
    if len(xy) < 2:
        return 1.0
    dist, _ = cKDTree(xy).query(xy, k=2)
    return 0.5 * float(np.median(dist[:, 1]))


def _measured(slide: Slide, truth: Slide | None) -> sp.csr_matrix | None:
    """Measured counts of ``slide``'s genes and spots: its own, or ``truth``'s (same spots, every gene)."""
    if truth is None:
        return sp.csr_matrix(slide.counts) if slide.counts is not None else None
    if [str(b) for b in truth.barcodes] != [str(b) for b in slide.barcodes]:
        raise InputError("--truth", "its spots differ from the prediction file's spots")
    tpos = {str(g): i for i, g in enumerate(truth.genes)}
    if truth.counts is None or any(str(g) not in tpos for g in slide.genes):
        raise InputError("--truth", "holds no measured counts for every predicted gene")
    return sp.csr_matrix(truth.counts)[:, [tpos[str(g)] for g in slide.genes]]


def pc1_share(x: np.ndarray) -> float:
    """Share of the total variance of ``x`` ``[N, G]`` on its first principal component."""
    x = x - x.mean(0)
    s = np.linalg.svd(x, compute_uv=False)
    return float(s[0] ** 2 / max((s**2).sum(), 1e-30))


def map_agreement(
    pred: Slide, genes: Sequence[str], values: str = "normalised", truth: Slide | None = None
) -> dict[str, Any]:
    """How well predicted maps follow the measured ones, and whether different genes' maps differ.

    Args:
        pred: A prediction `Slide` (with the measured counts of the same spots, or give ``truth``).
        genes: Genes to compare.
        values: Map values (`VALUES`).
        truth: The measured slide when ``pred`` carries no counts.

    Returns:
        ``{"values", "per_gene": {gene: Pearson r of predicted vs measured map}, "between_genes":
        {"measured": [[r]], "predicted": [[r]]}, "pc1_share": {"measured", "predicted"}}`` (between-gene
        matrices in the order of ``genes``; PC1 share of the variance over all the model's genes: near 1
        when one pattern, e.g. library size, dominates every map).
    """
    measured = _measured(pred, truth)
    if pred.predicted is None or measured is None:
        raise InputError(f"slide {pred.slide_id!r}", "needs predictions and the measured counts of the same spots")
    cols = _columns(pred, genes)
    every = list(range(len(pred.genes)))
    p_all, m_all = gene_values(pred.predicted, every, values), gene_values(measured, every, values)
    p, m = p_all[:, cols], m_all[:, cols]
    return {
        "values": VALUES[values],
        "per_gene": {g: pearson(p[:, j], m[:, j]) for j, g in enumerate(genes)},
        "between_genes": {
            "measured": [[pearson(m[:, i], m[:, j]) for j in range(len(genes))] for i in range(len(genes))],
            "predicted": [[pearson(p[:, i], p[:, j]) for j in range(len(genes))] for i in range(len(genes))],
        },
        "pc1_share": {"measured": pc1_share(m_all), "predicted": pc1_share(p_all)},
    }


def _columns(slide: Slide, genes: Sequence[str]) -> list[int]:
    pos = {str(g): i for i, g in enumerate(slide.genes)}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise InputError("--genes", f"not among the slide's {len(pos)} genes: {missing[:5]}")
    return [pos[g] for g in genes]


def _load(x: str | Path | Slide) -> Slide:
    return x if isinstance(x, Slide) else read_prepared(x)


def draw_spots(ax, xy: np.ndarray, diameter: float, vals: np.ndarray, cmap: str, vmin: float, vmax: float):
    """Spots as circles of their real diameter (data units), coloured by ``vals``."""
    from matplotlib.collections import EllipseCollection

    coll = EllipseCollection(
        np.full(len(xy), diameter), np.full(len(xy), diameter), np.zeros(len(xy)), units="xy",
        offsets=xy, offset_transform=ax.transData, cmap=cmap, alpha=0.85, linewidths=0,
    )
    coll.set_array(np.asarray(vals, dtype=np.float64))
    coll.set_clim(vmin, vmax)
    ax.add_collection(coll)
    return coll


def plot_genes(
    pred: str | Path | Slide,
    genes: Sequence[str],
    out: str | Path,
    *,
    truth: str | Path | Slide | None = None,
    values: str = "normalised",
    dpi: int = 120,
) -> Path:
    """One row per gene: measured (when known), predicted and MC-dropout std maps over the H&E.

    Args:
        pred: A prediction file (``hist-st predict`` / ``cv`` output) or a prediction `Slide`.
        genes: Genes to draw (checked first).
        out: PNG path.
        truth: The measured slide (prepared ``.h5ad`` or `Slide`) when ``pred`` carries no measured counts.
        values: ``"normalised"`` (default: log1p of counts per 10k over the model's genes), ``"log1p"``
            or ``"counts"``; the colour bar says which.
        dpi: Resolution.

    Returns:
        The PNG path. Measured and predicted panels of a gene share one colour scale; the predicted
        panel's title gives its Pearson r with the measured map.

    Raises:
        InputError: genes not predicted, no predictions, spots of ``truth`` differ from ``pred``.
    """
    plt = pyplot()
    if values not in VALUES:
        raise InputError("--values", f"unknown values {values!r}; use {', '.join(VALUES)}")
    slide = _load(pred)
    if slide.predicted is None:
        raise InputError(pred if not isinstance(pred, Slide) else slide.slide_id, "holds no predictions")
    cols = _columns(slide, genes)
    counts = _measured(slide, _load(truth) if truth is not None else None)
    measured = gene_values(counts, cols, values) if counts is not None else None
    predicted = gene_values(slide.predicted, cols, values)
    std = np.asarray(slide.predicted_std, dtype=np.float64)[:, cols] if slide.predicted_std is not None else None

    image, scale = slide.plot_image()
    xy = np.asarray(slide.spatial, dtype=np.float64) * scale
    diameter = spot_diameter_px(slide) * scale
    # the view: the spots and a margin of two spot diameters (the tissue, not the whole slide)
    x0, y0 = np.maximum(xy.min(0) - 2 * diameter, 0.0)
    x1, y1 = xy.max(0) + 2 * diameter
    if image is not None:
        x1, y1 = min(x1, image.shape[1]), min(y1, image.shape[0])
    w, h = x1 - x0, y1 - y0
    panels = (["measured"] if measured is not None else []) + ["predicted"] + (["std"] if std is not None else [])
    aspect = h / max(w, 1)
    fig, axes = plt.subplots(len(genes), len(panels), figsize=(4.2 * len(panels), 4.2 * aspect * len(genes) + 0.4),
                             dpi=dpi, squeeze=False)
    label = VALUES[values]
    for r, gene in enumerate(genes):
        vals = {"predicted": predicted[:, r]}
        if measured is not None:
            vals["measured"] = measured[:, r]
        both = np.concatenate(list(vals.values()))
        vmin, vmax = float(np.percentile(both, 1)), float(np.percentile(both, 99))
        vmax = max(vmax, vmin + 1e-6)
        for c, kind in enumerate(panels):
            ax = axes[r, c]
            if image is not None:
                ax.imshow(image)
            if kind == "std":
                sd = std[:, r]
                coll = draw_spots(ax, xy, diameter, sd, "magma", float(sd.min()), float(max(sd.max(), sd.min() + 1e-6)))
                title, cbar = f"{gene}: MC-dropout std", "std of predicted counts"
            else:
                coll = draw_spots(ax, xy, diameter, vals[kind], "viridis", vmin, vmax)
                title, cbar = f"{gene}: {kind}", label
                if kind == "predicted" and measured is not None:
                    title += f" (r = {pearson(vals['predicted'], vals['measured']):.2f})"
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)
            ax.set_aspect("equal")
            ax.set_axis_off()
            ax.set_title(f"{slide.slide_id} {title}", fontsize=9)
            fig.colorbar(coll, ax=ax, fraction=0.04, pad=0.01).set_label(cbar, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)
