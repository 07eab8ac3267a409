"""Calibration-token analysis (the paper's Table 6 and Figure 4: `plot_token_pca`).

The final calibration token of each slide is read from the fold models of a cross-validation run
(``hist-st cv`` / ``hist-st bench accuracy``; `export_tokens`). Discriminability across groups (patient,
technology, any metadata column; `token_metrics`): leave-one-out 1-NN and nearest-centroid accuracy (cosine),
within- and between-group cosine distances, and the chance levels of both accuracies.

```python
from hist_st.experiments import export_tokens, token_metrics
tok = export_tokens("runs/acc/her2st", "cohorts/her2st")          # {"slide_ids", "tokens" [S, D], ...}
token_metrics(tok["tokens"], groups)
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hist_st.errors import InputError
from hist_st.evaluate import fold_model, slide_groups
from hist_st.jsonio import write_json
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.pl import pyplot, save_figure
from hist_st.slide import Slide
from hist_st.train.data import load_slides, read_manifest
from hist_st.train.folds import load_folds
from hist_st.train.predict import lattice_unit_for

__all__ = ["slide_token", "export_tokens", "token_metrics", "cosine_distances", "plot_token_pca",
           "run_token_analysis"]


@torch.no_grad()
def slide_token(bundle: Any, slide: Any) -> np.ndarray:
    """The final calibration tokens of ``slide`` under a trained model, flattened: float32 ``[T * d]``.

    The slide goes through the model exactly as in `hist_st.train.predict.predict_log1p` (same features,
    standardisation, lattice unit; eval mode, no augmentation).

    Raises:
        InputError: The model has no calibration token, or the slide lacks the model's embedding.
    """
    if bundle.embedding not in slide.embeddings:
        raise InputError(f"slide {slide.slide_id!r}", f"has no embedding {bundle.embedding!r}")
    feats = torch.from_numpy(np.asarray(slide.embeddings[bundle.embedding], dtype=np.float32))
    if bundle.feature_mean is not None:
        feats = (feats - bundle.feature_mean.cpu()) / bundle.feature_std.cpu()
    lat = to_lattice(continuous_coords(slide, lattice_unit_for(bundle, slide)), source=f"slide {slide.slide_id!r}")
    model, was_training = bundle.model, bundle.model.training
    model.eval()
    try:
        batch = model.make_batch(torch.from_numpy(lat), feats).to(bundle.device)
        _, tokens = model(batch, return_tokens=True)
    finally:
        model.train(was_training)
    if tokens is None:
        raise InputError("model", "this model has no calibration token (model.tokens = ())")
    return tokens.float().reshape(-1).cpu().numpy()


def export_tokens(
    run_dir: str | Path,
    cohort: str | Path,
    *,
    source: str = "test",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Final calibration token of every slide from the fold models of a `run_cv` directory.

    Args:
        run_dir: A cross-validation run directory (``splits.json``, ``fold_<i>/model.pt``).
        cohort: The prepared cohort the run was trained on.
        source: ``"test"`` (each slide through the fold model that held it out) or ``"fold:<i>"`` (every
            slide through fold ``i``'s model).
        out: Optional ``.npz`` path; also writes a CSV beside it (slide id, fold, token values).

    Returns:
        ``{"slide_ids": [S], "tokens": float32 [S, D], "fold": int [S], "source": str}``.
    """
    slides = {s.slide_id: s for s in load_slides(cohort)}
    return _export_tokens(run_dir, cohort, slides, source=source, out=out)


def _export_tokens(
    run_dir: str | Path, cohort: str | Path, slides: Mapping[str, Slide], *, source: str,
    out: str | Path | None,
) -> dict[str, Any]:
    """`export_tokens` on the cohort's slides ``slides`` (slide id -> `Slide`), already loaded."""
    folds = load_folds(Path(run_dir) / "splits.json")
    if source == "test":
        pairs = sorted((sid, int(f["fold"])) for f in folds for sid in f["test"])
    elif source.startswith("fold:"):
        pairs = sorted((sid, int(source.split(":", 1)[1])) for sid in {s for f in folds for s in f["test"]})
    else:
        raise InputError("--source", f"use 'test' or 'fold:<i>', got {source!r}")
    missing = [sid for sid, _ in pairs if sid not in slides]
    if missing:
        raise InputError(cohort, f"slides of the run are missing from the cohort: {missing[:5]}")
    bundles = {i: fold_model(run_dir, i) for i in sorted({i for _, i in pairs})}
    ids, fold_of = [sid for sid, _ in pairs], np.asarray([i for _, i in pairs])
    tokens = np.stack([slide_token(bundles[i], slides[sid]) for sid, i in pairs]).astype(np.float32)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, slide_ids=np.asarray(ids), tokens=tokens, fold=fold_of, source=source)
        values = pd.DataFrame(tokens, columns=[f"t{j}" for j in range(tokens.shape[1])])
        pd.concat([pd.DataFrame({"slide_id": ids, "fold": fold_of}), values], axis=1).to_csv(
            out.with_suffix(".csv"), index=False, float_format="%.6g")
    return {"slide_ids": ids, "tokens": tokens, "fold": fold_of, "source": source}


def cosine_distances(x: np.ndarray) -> np.ndarray:
    """Pairwise cosine distance ``1 - cos`` of the rows of ``x`` ``[S, D]`` -> ``[S, S]`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if (norm == 0).any():
        raise ValueError("a token vector is all zeros; cosine distance is undefined")
    u = x / norm
    d = 1.0 - u @ u.T
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, 2.0)


def token_metrics(tokens: np.ndarray, groups: Sequence[Any]) -> dict[str, Any]:
    """Discriminability of per-slide tokens across groups (Table 6).

    Args:
        tokens: ``[S, D]`` one vector per slide.
        groups: ``[S]`` group label of each slide.

    Returns:
        ``one_nn_acc`` (leave-one-out 1-NN same-group accuracy, cosine), ``centroid_acc`` (leave-one-out
        nearest-centroid accuracy; centroids are group means of the other slides, a group left empty by the
        held-out slide is not a candidate), ``within_cos`` / ``between_cos`` (mean cosine distance over
        slide pairs of the same / different groups; NaN when there are no such pairs), ``chance_1nn``
        (mean over slides of (same-group others) / (S - 1)), ``chance_majority`` (largest group / S),
        ``n_slides``, ``n_groups``, ``group_sizes`` and ``n_singletons`` (slides alone in their group, which
        no leave-one-out rule can place correctly).

    Raises:
        ValueError: Fewer than 2 slides, or shapes that disagree.
    """
    x = np.asarray(tokens, dtype=np.float64)
    g = np.asarray([str(v) for v in groups])
    s = x.shape[0]
    if x.ndim != 2 or s != len(g):
        raise ValueError(f"tokens {x.shape} and {len(g)} group labels disagree")
    if s < 2:
        raise ValueError("need at least 2 slides")
    d = cosine_distances(x)
    nn = np.where(~np.eye(s, dtype=bool), d, np.inf).argmin(axis=1)  # the nearest other slide
    labels = np.unique(g)
    member = (g[:, None] == labels[None, :]).astype(np.float64)  # [S, L]
    n_others = member.sum(0) - member  # [S, L]: members of each group other than slide i
    others_sum = member.T @ x - member[:, :, None] * x[:, None, :]  # [S, L, D]
    centroids = others_sum / np.maximum(n_others, 1)[:, :, None]
    norms = np.linalg.norm(centroids, axis=2) * np.linalg.norm(x, axis=1)[:, None]
    usable = (n_others > 0) & (norms > 0)  # an empty or zero centroid is no candidate
    cos = np.einsum("sd,sld->sl", x, centroids) / np.where(usable, norms, 1.0)
    correct = usable.any(1) & (labels[np.where(usable, 1.0 - cos, np.inf).argmin(1)] == g)
    iu = np.triu_indices(s, k=1)
    pair_d, pair_same = d[iu], (g[:, None] == g[None, :])[iu]
    within, between = (float(pair_d[m].mean()) if m.any() else float("nan") for m in (pair_same, ~pair_same))
    counts = {lab: int((g == lab).sum()) for lab in labels}
    return {"one_nn_acc": float(np.mean(g[nn] == g)), "centroid_acc": float(np.mean(correct)),
            "within_cos": within, "between_cos": between,
            "chance_1nn": float(np.mean([(counts[v] - 1) / (s - 1) for v in g])),
            "chance_majority": max(counts.values()) / s, "n_slides": int(s), "n_groups": len(labels),
            "group_sizes": counts, "n_singletons": int(sum(1 for v in g if counts[v] == 1))}


def plot_token_pca(
    tokens: np.ndarray, groups: Sequence[Any], out: str | Path, *, labels: Sequence[str] | None = None,
    title: str = "calibration token PCA",
) -> Path:
    """Scatter of the per-slide tokens on their first two principal components, coloured by group."""
    from sklearn.decomposition import PCA

    plt = pyplot()
    x = np.asarray(tokens, dtype=np.float64)
    z = PCA(n_components=int(min(2, *x.shape))).fit(x)
    coords = np.pad(z.transform(x), ((0, 0), (0, 2 - z.n_components_)))  # one component: PC2 = 0
    ev = [*z.explained_variance_ratio_, 0.0]
    g = np.asarray([str(v) for v in groups])
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    cmap = plt.get_cmap("tab20")
    for k, lab in enumerate(sorted(set(g))):
        ax.scatter(*coords[g == lab].T, s=40, color=cmap(k % 20), label=lab, edgecolors="k", linewidths=0.4)
    if labels is not None and len(labels) <= 60:
        for (px, py), lab in zip(coords, labels):
            ax.annotate(str(lab), (px, py), fontsize=6, alpha=0.7, xytext=(2, 2), textcoords="offset points")
    ax.set(xlabel=f"PC1 ({100 * ev[0]:.1f}%)", ylabel=f"PC2 ({100 * ev[1]:.1f}%)", title=title)
    if len(set(g)) <= 20:
        ax.legend(fontsize=7, loc="best", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def _groups_for(
    cohort: str | Path, slides: Mapping[str, Slide], slide_ids: Sequence[str], column: str,
) -> list[str]:
    """Each slide's group: itself, its technology or its ``column`` (an unknown one is a group of its own);
    ``slides``: the cohort's slides by id."""
    if column == "slide":
        return list(slide_ids)
    chosen = [slides[sid] for sid in slide_ids]
    if column == "technology":
        return [s.technology for s in chosen]
    mapping = slide_groups(chosen, column, read_manifest(cohort))
    return [mapping[sid] if mapping[sid] is not None else f"{sid} (unknown {column})" for sid in slide_ids]


def run_token_analysis(
    run_dir: str | Path,
    cohort: str | Path,
    out_dir: str | Path,
    *,
    group_by: Sequence[str] = ("patient",),
    source: str = "test",
) -> dict[str, Any]:
    """Export tokens, score them against each grouping and draw the PCA plots.

    Args:
        run_dir: Cross-validation run directory with fold models.
        cohort: Its prepared cohort.
        out_dir: Output: ``tokens.npz``/``tokens.csv``, ``token_metrics.json``, ``tokens.md``,
            ``token_pca_<column>.png``.
        group_by: Metadata columns: ``patient``, ``technology``, a ``cohort.json`` mapping, or a key of
            ``slide.meta``.
        source: See `export_tokens`.

    Returns:
        ``{"metrics": {column: token_metrics(...)}, "table": str, "figures": [paths], "n_slides": S}``.
    """
    out, slides = Path(out_dir), {s.slide_id: s for s in load_slides(cohort)}  # read once, for every step
    tok = _export_tokens(run_dir, cohort, slides, source=source, out=out / "tokens.npz")
    metrics, figures = {}, []  # column -> token_metrics; PCA figure paths
    for col in group_by:
        groups = _groups_for(cohort, slides, tok["slide_ids"], col)
        metrics[col] = token_metrics(tok["tokens"], groups)
        figures.append(str(plot_token_pca(tok["tokens"], groups, out / f"token_pca_{col}.png",
                                          labels=tok["slide_ids"], title=f"calibration token PCA by {col}")))
    table = format_token_table(metrics)
    write_json({"metrics": metrics, "source": source, "run_dir": str(run_dir), "slide_ids": tok["slide_ids"]},
               out / "token_metrics.json")
    (out / "tokens.md").write_text(f"Calibration-token discriminability (Table 6), tokens from {source!r} "
                                   f"models of {run_dir}; cosine distance; leave-one-out.\n\n{table}\n")
    return {"metrics": metrics, "table": table, "figures": figures, "n_slides": len(tok["slide_ids"])}


def format_token_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown Table 6, one row per grouping column (with chance levels)."""
    lines = ["| Grouping | slides / groups | 1-NN same-group (chance) | Nearest-centroid acc (majority) "
             "| Within cos. dist | Between cos. dist |", "|---|---|---|---|---|---|",
             *(f"| {col} | {m['n_slides']} / {m['n_groups']} | {m['one_nn_acc']:.3f} ({m['chance_1nn']:.3f}) "
               f"| {m['centroid_acc']:.3f} ({m['chance_majority']:.3f}) | {m['within_cos']:.3f} "
               f"| {m['between_cos']:.3f} |" for col, m in metrics.items())]
    notes = [f"{col}: {m['n_singletons']} of {m['n_slides']} slides are alone in their group and cannot be matched"
             for col, m in metrics.items() if m.get("n_singletons")]
    return "\n".join(lines) + ("\n\n" + "; ".join(notes) + "." if notes else "")
