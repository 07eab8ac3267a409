"""Per-gene scores by how much a gene is expressed: where in the gene list a method wins or loses.

A mean of per-gene Pearson over 2,000 highly variable genes mixes genes that are expressed in most spots
with genes detected in a few, whose correlations are near zero for every method and where a spot's
sequencing depth is most of what can be predicted. Splitting the genes into fifths by their mean
expression shows which part of the list a difference between methods comes from.

```python
from hist_st.evaluate.strata import expression_level, per_gene_by_level
level = expression_level(plan.slides.values(), plan.genes)      # [G] mean normalised log1p expression
print(per_gene_by_level(per_gene_rows(run_dir), plan.genes, level))
```

The level is descriptive: the same for every method, computed once over every spot of the cohort, and
never used to fit or choose anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from hist_st.harmonise import log_normalised
from hist_st.slide import Slide

__all__ = ["expression_level", "per_gene_by_level"]


def expression_level(slides: Iterable[Slide], genes: Sequence[str]) -> np.ndarray:
    """Each gene's mean of ``log1p(counts / total * 1e4)`` over every spot of ``slides``
    (`hist_st.harmonise.log_normalised`, the level the ``he:N`` gene ranking sorts by).

    ``total`` is the spot's count over all of its slide's genes; slides without counts are skipped; columns
    are picked by name.

    Returns:
        float64 ``[G]`` in ``genes`` order (NaN where no slide has counts).
    """
    sums, n = np.zeros(len(genes)), 0
    for slide in slides:
        if slide.counts is None:
            continue
        index = {str(g): i for i, g in enumerate(slide.genes)}
        picked = log_normalised(slide.counts, dtype=np.float64)[:, [index[str(g)] for g in genes]]
        sums += np.asarray(picked.sum(axis=0)).ravel()
        n += picked.shape[0]
    return sums / n if n else np.full(len(genes), np.nan)


def per_gene_by_level(
    rows: Sequence[Mapping[str, Any]], genes: Sequence[str], level: np.ndarray, *, n_bins: int = 5,
    methods: Sequence[str] | None = None,
) -> str:
    """Markdown table: mean per-gene Pearson of each method within each ``n_bins``-quantile of ``level``.

    Args:
        rows: `hist_st.experiments.accuracy.per_gene_rows` of one run (``method``, ``gene``,
            ``pcc_fold<i>``).
        genes: The run's genes, in the order of ``level``.
        level: Each gene's expression level (`expression_level`).
        n_bins: Number of groups of (nearly) equal size, least expressed first.
        methods: Column order (default: as first met in ``rows``).

    Returns:
        One row per group (its level range and gene count) and one for all genes; one column per method:
        the mean over folds and the group's genes of per-gene Pearson, so the last row is the mean over
        every (fold, gene) pair.
    """
    methods = list(methods or dict.fromkeys(str(r["method"]) for r in rows))
    position = {str(g): i for i, g in enumerate(genes)}
    scores = {m: [[] for _ in genes] for m in methods}  # method -> gene -> its per-fold values
    for r in rows:
        i = position.get(str(r["gene"]))
        if i is not None and str(r["method"]) in scores:
            scores[str(r["method"])][i] += [v for k, v in r.items() if k.startswith("pcc_fold") and v is not None]
    order = np.argsort(np.asarray(level, dtype=float), kind="stable")
    groups = [g for g in np.array_split(order, n_bins) if len(g)]
    head = "| genes by mean expression (normalised log1p) | genes | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]

    def cells(idx: Sequence[int]) -> str:
        means = [np.mean(v) if (v := [x for i in idx for x in scores[m][i]]) else float("nan") for m in methods]
        return " | ".join(f"{x:.3f}" for x in means)

    for k, idx in enumerate(groups):
        lo, hi = level[idx].min(), level[idx].max()
        name = "least expressed" if k == 0 else "most expressed" if k == len(groups) - 1 else ""
        lines.append(f"| {k + 1} of {len(groups)}{f' ({name})' if name else ''}: {lo:.3f}-{hi:.3f} | {len(idx)} | "
                     f"{cells(idx)} |")
    lines.append(f"| all | {len(genes)} | {cells(range(len(genes)))} |")
    return "\n".join(lines)
