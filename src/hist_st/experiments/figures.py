"""Figures: gene maps (appendix C, `hist_st.pl.plot_genes`) and calibration-token PCA (Figure 4); the scaling
curves (Figure 3) are `hist_st.bench.plots.plot_scaling`.

```python
from hist_st.experiments import plot_genes
plot_genes("runs/acc/her2st/fold_0/predictions/A1.h5ad", ["ERBB2", "GNAS"], "A1_genes.png")
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.pl import plot_genes, pyplot, save_figure

__all__ = ["plot_genes", "plot_token_pca", "pyplot", "save_figure"]


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
