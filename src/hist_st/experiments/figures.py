"""Figures: gene maps (appendix C, `hist_st.pl.plot_genes`), calibration-token PCA (Figure 4), scaling
curves (Figure 3).

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

from hist_st.pl import plot_genes

__all__ = ["plot_genes", "plot_token_pca", "plot_scaling", "pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (parents created, tight bounding box) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_token_pca(
    tokens: np.ndarray, groups: Sequence[Any], out: str | Path, *, labels: Sequence[str] | None = None,
    title: str = "calibration token PCA",
) -> Path:
    """Scatter of the per-slide tokens on their first two principal components, coloured by group."""
    from sklearn.decomposition import PCA

    plt = pyplot()
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
    return save_figure(fig, out)


def plot_scaling(records: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Figure 3: train and inference time (top) and peak memory (bottom) against spots and genes, log-log.

    Args:
        records: Dicts with ``method``, ``axis`` (``"spots"`` or ``"genes"``), ``n_spots``, ``n_genes``,
            ``train_s_per_slide``, ``infer_s_per_slide``, ``train_mem_gb``, ``infer_mem_gb``; failed
            runs (``error``) or missing values are left out.
        out: PNG path.
    """
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), dpi=120)
    methods = sorted({r["method"] for r in records}, key=lambda m: (m != "hist", m))
    cmap = plt.get_cmap("tab10")
    colour = {m: cmap(i % 10) for i, m in enumerate(methods)}
    cols = [("spots", "train"), ("spots", "infer"), ("genes", "train"), ("genes", "infer")]
    for c, (axis, phase) in enumerate(cols):
        xkey = "n_spots" if axis == "spots" else "n_genes"
        for r, (key, ylabel) in enumerate(((f"{phase}_s_per_slide", f"{phase} s/slide"),
                                           (f"{phase}_mem_gb", f"{phase} memory GB (CPU: ΔRSS)"))):
            ax = axes[r, c]
            for m in methods:
                pts = sorted((rec[xkey], rec[key]) for rec in records if rec["method"] == m and rec["axis"] == axis
                             and rec.get(key) is not None and rec[key] > 0)
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
    return save_figure(fig, out)
