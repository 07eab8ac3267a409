"""Figures: gene maps (appendix C), calibration-token PCA (Figure 4), scaling curves (Figure 3).

```python
from hist_st.experiments import plot_genes
plot_genes("runs/acc/her2st/fold_0/predictions/A1.h5ad", ["ERBB2", "GNAS"], "A1_genes.png")
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.errors import InputError

__all__ = ["plot_genes", "plot_token_pca", "plot_scaling"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_genes(
    pred: str | Path | Any,
    genes: Sequence[str],
    out: str | Path,
    *,
    truth: str | Path | Any | None = None,
    spot_size: float | None = None,
    dpi: int = 120,
) -> Path:
    """H&E thumbnail, measured and predicted log-expression side by side, one row per gene.

    Args:
        pred: A prediction file (prepared-slide ``.h5ad`` with ``layers['predicted']``, as written by
            ``hist-st predict`` / ``hist-st cv``) or a `Slide` with ``predicted``.
        genes: Genes to draw (must be among the predicted genes).
        out: PNG path.
        truth: The measured slide (prepared ``.h5ad`` or `Slide`) when ``pred`` carries no counts.
        spot_size: Marker size (points^2); default from the number of spots.
        dpi: Resolution.

    Returns:
        The PNG path. Measured and predicted panels of a gene share one colour scale (log1p counts).

    Raises:
        InputError: Missing genes, no predictions, or no measured counts.
    """
    import scipy.sparse as sp

    from hist_st.slide import Slide, read_prepared

    slide = pred if isinstance(pred, Slide) else read_prepared(pred)
    if slide.predicted is None:
        raise InputError(pred if not isinstance(pred, Slide) else slide.slide_id, "holds no predictions (layers['predicted'])")
    pos = {str(g): i for i, g in enumerate(slide.genes)}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise InputError("--genes", f"not among the predicted genes: {missing[:5]}")
    meas = slide
    if truth is None and slide.counts is None and not isinstance(pred, Slide):
        # read_prepared leaves counts out of prediction files; `predict_slide` stores them in X when known.
        import anndata as ad

        x = ad.read_h5ad(pred).X
        if x is not None and sp.csr_matrix(x).nnz > 0:
            meas = Slide(slide.slide_id, slide.spatial, slide.barcodes, genes=slide.genes, counts=sp.csr_matrix(x))
    if truth is not None:
        meas = truth if isinstance(truth, Slide) else read_prepared(truth)
        if [str(b) for b in meas.barcodes] != [str(b) for b in slide.barcodes]:
            raise InputError("--truth", "its spots differ from the prediction file's spots")
    tpos = {str(g): i for i, g in enumerate(meas.genes)}
    if meas.counts is None or any(g not in tpos for g in genes):
        raise InputError("--truth", "no measured counts for these genes; pass the prepared slide with --truth")

    plt = _plt()
    xy = np.asarray(slide.spatial, dtype=np.float64)
    thumb, scale = slide.thumbnail, slide.thumbnail_scale
    if thumb is None and meas.thumbnail is not None:
        thumb, scale = meas.thumbnail, meas.thumbnail_scale
    has_he = thumb is not None
    ncol = 3 if has_he else 2
    fig, axes = plt.subplots(len(genes), ncol, figsize=(3.6 * ncol, 3.4 * len(genes)), dpi=dpi, squeeze=False)
    pts = xy * (scale if has_he and scale else 1.0)
    size = spot_size if spot_size is not None else float(np.clip(12000.0 / max(len(xy), 1), 2.0, 60.0))
    counts = sp.csr_matrix(meas.counts)
    for r, gene in enumerate(genes):
        y_true = np.log1p(np.asarray(counts[:, tpos[gene]].todense()).ravel())
        y_pred = np.log1p(np.asarray(slide.predicted[:, pos[gene]], dtype=np.float64))
        vmin = float(min(y_true.min(), y_pred.min()))
        vmax = float(max(np.percentile(y_true, 99), np.percentile(y_pred, 99), vmin + 1e-6))
        r_pcc = np.corrcoef(y_true, y_pred)[0, 1] if y_true.std() > 0 and y_pred.std() > 0 else float("nan")
        panels = []
        if has_he:
            ax = axes[r, 0]
            ax.imshow(thumb)
            ax.set_title(f"{slide.slide_id}: H&E")
            panels.append(ax)
        for j, (vals, title) in enumerate(((y_true, f"{gene} measured"), (y_pred, f"{gene} predicted (r={r_pcc:.2f})"))):
            ax = axes[r, j + (1 if has_he else 0)]
            if has_he:
                ax.imshow(thumb, alpha=0.35)
            sc = ax.scatter(pts[:, 0], pts[:, 1], c=vals, s=size, cmap="viridis", vmin=vmin, vmax=vmax, linewidths=0)
            if not has_he:
                ax.invert_yaxis()
            ax.set_title(title)
            panels.append(ax)
        fig.colorbar(sc, ax=axes[r, -1], fraction=0.046, pad=0.02, label="log1p counts")
        for ax in panels:
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, out)


def plot_token_pca(
    tokens: np.ndarray, groups: Sequence[Any], out: str | Path, *, labels: Sequence[str] | None = None,
    title: str = "calibration token PCA",
) -> Path:
    """Scatter of the per-slide tokens on their first two principal components, coloured by group."""
    from sklearn.decomposition import PCA

    plt = _plt()
    x = np.asarray(tokens, dtype=np.float64)
    n_comp = int(min(2, x.shape[0], x.shape[1]))
    z = PCA(n_components=n_comp).fit(x)
    coords = z.transform(x)
    if coords.shape[1] == 1:
        coords = np.concatenate([coords, np.zeros_like(coords)], axis=1)
    ev = list(z.explained_variance_ratio_) + [0.0]
    g = np.asarray([str(v) for v in groups])
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    cmap = plt.get_cmap("tab20")
    for k, lab in enumerate(sorted(set(g))):
        m = g == lab
        ax.scatter(coords[m, 0], coords[m, 1], s=40, color=cmap(k % 20), label=lab, edgecolors="k", linewidths=0.4)
    if labels is not None and len(labels) <= 60:
        for (px, py), lab in zip(coords, labels):
            ax.annotate(str(lab), (px, py), fontsize=6, alpha=0.7, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f}%)")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f}%)")
    ax.set_title(title)
    if len(set(g)) <= 20:
        ax.legend(fontsize=7, loc="best", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_scaling(records: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Figure 3: train and inference time (top) and peak memory (bottom) against spots and genes, log-log.

    Args:
        records: Dicts with ``method``, ``axis`` (``"spots"`` or ``"genes"``), ``n_spots``, ``n_genes``,
            ``train_s_per_slide``, ``infer_s_per_slide``, ``train_mem_gb``, ``infer_mem_gb``; failed
            runs (``error``) or missing values are left out.
        out: PNG path.
    """
    plt = _plt()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), dpi=120)
    methods = sorted({r["method"] for r in records}, key=lambda m: (m != "hist", m))
    cmap = plt.get_cmap("tab10")
    colour = {m: cmap(i % 10) for i, m in enumerate(methods)}
    cols = [("spots", "train"), ("spots", "infer"), ("genes", "train"), ("genes", "infer")]
    for c, (axis, phase) in enumerate(cols):
        xkey = "n_spots" if axis == "spots" else "n_genes"
        for r, (key, ylabel) in enumerate(((f"{phase}_s_per_slide", f"{phase} s/slide"),
                                           (f"{phase}_mem_gb", f"{phase} memory GB (CPU: ΔRSS)"))):  # fmt: skip
            ax = axes[r, c]
            for m in methods:
                pts = sorted((rec[xkey], rec[key]) for rec in records if rec["method"] == m and rec["axis"] == axis
                             and rec.get(key) is not None and rec[key] > 0)  # fmt: skip
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", lw=1.5, color=colour[m], label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            xs_all = sorted({rec[xkey] for rec in records if rec["axis"] == axis and "error" not in rec})
            if xs_all:  # label the measured sizes only (log-axis minor labels collide)
                ax.set_xticks(xs_all, [str(x) for x in xs_all])
                ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_xlabel("spots per slide" if axis == "spots" else "genes")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{phase} / {axis}")
            ax.grid(alpha=0.3, which="both")
    handles, labels = [], []
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out)
