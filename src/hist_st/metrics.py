"""Evaluation metrics: the two protocols of SPEC section 3, always reported side by side and labelled, and the
maps protocol.

- **pooled** (the HiST authors' released metric): per test slide, flatten the ``[N, G]`` matrices of
  predicted counts ``relu(expm1(pred_log1p))`` and raw counts into one vector each and compute R2
  (`sklearn.metrics.r2_score`) and Pearson on that one pair of vectors; average over the test slides of a
  fold. This number is dominated by the differences between gene means.
- **per-gene** ("per-gene PCC (HEST metric)"): in log1p space, Pearson per gene over all concatenated
  test spots of a fold, averaged over genes; genes constant in the test set are excluded (and counted).
  Per-gene R2 is reported too. This is HEST-Benchmark's metric, not its protocol: only with its 50 genes
  (``--genes hest-bench:50``) and its fixed patient-level splits (``--splits <task>/splits``) can the
  numbers sit beside its published table, and even then HEST-Benchmark lets a constant gene's NaN into
  its mean where this module drops and counts it.
- **maps** ("map PCC"): what a map shows (`hist_st.pl`): per test slide, predicted and measured counts are
  each normalised per spot to ``log1p`` of counts per 10k over the scored genes (`normalise_counts`, so a
  spot's library size is divided out), then Pearson per gene over the slide's spots, averaged over the genes
  that vary on the slide; averaged over the test slides of a fold. Neither paper reports it; a model can
  score well on log1p counts by predicting library size, which the maps divide out.

Predictions always enter in log1p space (what the model outputs); truths always enter as raw counts
(dense or ``scipy.sparse``). Fold summaries are mean and standard deviation over folds with ``ddof=0``
(numpy's default, as ``np.std``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "STD_DDOF",
    "pearson",
    "pearson_columns",
    "normalise_counts",
    "pooled_metrics",
    "per_gene_metrics",
    "map_metrics",
    "evaluate_fold",
    "summarise_folds",
    "format_table",
    "protocol_cells",
]

#: Degrees of freedom used for every std over folds (numpy's default, population std).
STD_DDOF = 0

_PROTOCOL_KEYS = (("pooled", "r2"), ("pooled", "pcc"), ("per_gene", "pcc"), ("per_gene", "r2"))


def _dense(x: Any, name: str) -> np.ndarray:
    arr = x.toarray() if sp.issparse(x) else np.asarray(x)
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, G] matrix, got shape {arr.shape}")
    return arr


def _check_pair(pred_log1p: Any, true_counts: Any) -> tuple[np.ndarray, np.ndarray]:
    pred = _dense(pred_log1p, "pred_log1p")
    true = _dense(true_counts, "true_counts")
    if pred.shape != true.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match truth shape {true.shape} ([N spots, G genes] each)"
        )
    if pred.size == 0:
        raise ValueError("empty prediction / truth matrices")
    if not np.all(np.isfinite(pred)):
        raise ValueError("predictions contain NaN or infinite values")
    return pred, true


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two arrays of the same size, flattened; NaN when either is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if den == 0.0:
        return float("nan")
    return float(np.clip((a * b).sum() / den, -1.0, 1.0))


def pearson_columns(a: Any, b: Any) -> np.ndarray:
    """Pearson correlation of each column pair of ``a`` and ``b``.

    Args:
        a, b: ``[N, G]`` arrays.

    Returns:
        float64 ``[G]`` in [-1, 1]; NaN where either column is constant.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))  # [G]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip((a * b).sum(axis=0) / den, -1.0, 1.0)
    r[den == 0] = np.nan
    return r


def pooled_metrics(pred_log1p: Any, true_counts: Any) -> dict[str, float]:
    """Pooled protocol for one slide: R2 and Pearson over the flattened count matrix.

    Args:
        pred_log1p: Predictions in log1p space ``[N, G]`` (model output); converted to counts with
            ``relu(expm1(.))`` before scoring.
        true_counts: Raw counts ``[N, G]`` (dense array or scipy.sparse matrix), NOT log-transformed.

    Returns:
        ``{"r2": float, "pcc": float}``. R2 is `sklearn.metrics.r2_score` on the flattened vectors
        (truth first); ``pcc`` is NaN when either vector is constant.

    Raises:
        ValueError: On a shape mismatch or non-finite predictions.
    """
    from sklearn.metrics import r2_score

    pred, true = _check_pair(pred_log1p, true_counts)
    pred_counts = np.maximum(np.expm1(pred), 0.0).ravel()  # [N*G]
    true_flat = true.ravel()  # [N*G]
    return {"r2": float(r2_score(true_flat, pred_counts)), "pcc": pearson(pred_counts, true_flat)}


def per_gene_metrics(pred_log1p: Any, true_counts: Any) -> dict[str, Any]:
    """Per-gene protocol (the HEST metric): Pearson and R2 per gene in log1p space, averaged over genes.

    Genes whose truth is constant over the given spots are excluded from both means (their per-gene
    values are NaN) and counted in ``n_excluded_constant``. A gene whose *prediction* is constant (but
    truth is not) has an undefined Pearson; it is scored 0 (no linear association) and counted in
    ``n_constant_pred``; its R2 is computed normally.

    Args:
        pred_log1p: Predictions in log1p space ``[N, G]`` (all concatenated test spots).
        true_counts: Raw counts ``[N, G]`` (dense or scipy.sparse); ``log1p`` is applied here.

    Returns:
        Dict with ``pcc`` and ``r2`` (means over the evaluated genes), ``pcc_per_gene`` and
        ``r2_per_gene`` (float64 ``[G]``, NaN for excluded genes), ``n_genes`` (G),
        ``n_evaluated``, ``n_excluded_constant``, ``excluded_genes`` (int64 indices) and
        ``n_constant_pred``.

    Raises:
        ValueError: On a shape mismatch or non-finite predictions.
    """
    pred, true = _check_pair(pred_log1p, true_counts)
    y = np.log1p(true)  # [N, G]
    yc = y - y.mean(axis=0)
    ss_true = (yc * yc).sum(axis=0)  # [G]
    const_true = np.ptp(y, axis=0) == 0  # [G] exactly constant over the test spots
    const_pred = np.ptp(pred, axis=0) == 0  # [G]
    ok = ~const_true
    pcc = pearson_columns(pred, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ((y - pred) ** 2).sum(axis=0) / ss_true
    pcc[ok & const_pred] = 0.0
    pcc[~ok] = np.nan
    r2[~ok] = np.nan
    n_eval = int(ok.sum())
    return {
        "pcc": float(np.mean(pcc[ok])) if n_eval else float("nan"),
        "r2": float(np.mean(r2[ok])) if n_eval else float("nan"),
        "pcc_per_gene": pcc,
        "r2_per_gene": r2,
        "n_genes": int(y.shape[1]),
        "n_evaluated": n_eval,
        "n_excluded_constant": int(const_true.sum()),
        "excluded_genes": np.flatnonzero(const_true).astype(np.int64),
        "n_constant_pred": int((ok & const_pred).sum()),
    }


def normalise_counts(counts: Any, target_sum: float = 1e4) -> np.ndarray:
    """``log1p(counts / spot total * target_sum)`` per spot, as scanpy's ``normalize_total`` + ``log1p``.

    Args:
        counts: ``[N, G]`` counts (dense or sparse); negative values (a regression's ``expm1`` of a
            log1p prediction below 0) count as 0. Spots whose total is 0 stay 0.

    Returns:
        float64 ``[N, G]``.
    """
    x = np.maximum(np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float64), 0.0)
    total = x.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.where(total > 0, x / total * target_sum, 0.0)
    return np.log1p(x)


def map_metrics(pred_log1p: Any, true_counts: Any) -> dict[str, Any]:
    """Maps protocol for one slide: Pearson per gene of the library-size-normalised maps, over its spots.

    Both matrices are normalised over their ``G`` genes (`normalise_counts` of ``expm1(pred_log1p)`` and of
    the counts), as `hist_st.pl` draws maps. Genes constant on the slide after normalisation are excluded;
    a gene whose normalised prediction is constant (but truth is not) scores 0, as in `per_gene_metrics`;
    here "constant" allows float32 rounding (a range below 1e-5 of the values' size, far below what a colour
    scale shows), because normalising a float32 prediction that only scales every gene by the spot's library
    size leaves rounding noise, not a map.

    Returns:
        ``{"pcc": mean over the evaluated genes (NaN when none), "n_evaluated": int}``.

    Raises:
        ValueError: On a shape mismatch or non-finite predictions.
    """
    pred, true = _check_pair(pred_log1p, true_counts)
    p, m = normalise_counts(np.expm1(pred)), normalise_counts(true)
    ok = np.ptp(m, axis=0) > 0  # [G]
    r = pearson_columns(p[:, ok], m[:, ok])
    flat = np.ptp(p[:, ok], axis=0) <= 1e-5 * np.maximum(1.0, np.abs(p[:, ok]).max(axis=0, initial=0.0))
    r[np.isnan(r) | flat] = 0.0  # constant normalised prediction
    return {"pcc": float(np.mean(r)) if ok.any() else float("nan"), "n_evaluated": int(ok.sum())}


def evaluate_fold(preds: Mapping[str, Any], truths: Mapping[str, Any]) -> dict[str, Any]:
    """Score one fold's test slides under both protocols and the maps protocol.

    Args:
        preds: Slide id -> predictions in log1p space ``[N_s, G]``.
        truths: Slide id -> raw counts ``[N_s, G]`` (dense or scipy.sparse); same keys as ``preds``.

    Returns:
        Dict with
        ``pooled``: ``{"r2", "pcc"}`` means over test slides of the per-slide pooled metrics;
        ``per_gene``: `per_gene_metrics` over the test spots concatenated in sorted slide-id order
        (including the per-gene arrays);
        ``maps``: ``{"pcc"}`` mean over test slides of `map_metrics`;
        ``per_slide``: slide id -> ``{"r2", "pcc", "map_pcc", "n_spots"}`` (pooled and maps protocols);
        ``slides``: the sorted slide ids; ``n_spots``: total test spots.

    Raises:
        ValueError: When the slide ids differ, a slide's shapes mismatch, or gene counts differ.
    """
    if set(preds) != set(truths):
        missing = sorted(set(truths) - set(preds))
        extra = sorted(set(preds) - set(truths))
        raise ValueError(f"prediction and truth slides differ: missing predictions {missing}, extra {extra}")
    if not preds:
        raise ValueError("no test slides to evaluate")
    slides = sorted(preds)
    per_slide: dict[str, dict[str, float]] = {}
    pred_list, true_list = [], []
    n_genes = None
    for sid in slides:
        try:
            pred, true = _check_pair(preds[sid], truths[sid])
        except ValueError as exc:
            raise ValueError(f"slide {sid!r}: {exc}") from exc
        if n_genes is not None and pred.shape[1] != n_genes:
            raise ValueError(f"slide {sid!r} has {pred.shape[1]} genes, earlier slides have {n_genes}")
        n_genes = pred.shape[1]
        m = pooled_metrics(pred, true)
        per_slide[sid] = {**m, "map_pcc": map_metrics(pred, true)["pcc"], "n_spots": int(pred.shape[0])}
        pred_list.append(pred)
        true_list.append(true)
    pooled = {k: float(np.mean([per_slide[s][k] for s in slides])) for k in ("r2", "pcc")}
    per_gene = per_gene_metrics(np.concatenate(pred_list), np.concatenate(true_list))
    return {
        "pooled": pooled,
        "per_gene": per_gene,
        "maps": {"pcc": float(np.mean([per_slide[s]["map_pcc"] for s in slides]))},
        "per_slide": per_slide,
        "slides": slides,
        "n_spots": int(sum(p.shape[0] for p in pred_list)),
    }


def summarise_folds(folds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std over folds for each protocol (std with ``ddof=STD_DDOF`` = 0, numpy's default).

    Args:
        folds: `evaluate_fold` results, one per fold.

    Returns:
        ``{"pooled": {"r2": s, "pcc": s}, "per_gene": {"pcc": s, "r2": s}, "maps": {"pcc": s}, "n_folds": K,
        "ddof": 0}`` where each ``s`` is ``{"mean": float, "std": float, "values": [K floats]}``; NaN fold
        values propagate (a NaN in any fold gives a NaN mean). ``maps`` is left out when a fold record lacks
        it (one written before the maps protocol existed).

    Raises:
        ValueError: On an empty list.
    """
    if len(folds) == 0:
        raise ValueError("no fold results to summarise")
    out: dict[str, Any] = {"pooled": {}, "per_gene": {}, "n_folds": len(folds), "ddof": STD_DDOF}
    keys = _PROTOCOL_KEYS + ((("maps", "pcc"),) if all("maps" in f for f in folds) else ())
    for proto, key in keys:
        vals = np.array([float(f[proto][key]) for f in folds], dtype=np.float64)
        out.setdefault(proto, {})[key] = {
            "mean": float(np.mean(vals)),
            "std": float(np.std(vals, ddof=STD_DDOF)),
            "values": vals.tolist(),
        }
    return out


def _fmt(stat: Mapping[str, float | None], digits: int) -> str:
    """``mean ± std``; diverged values (R2 of exploding predictions) print as bounds, not 200-digit numbers."""
    mean, std = stat.get("mean"), stat.get("std")
    if mean is None or not np.isfinite(mean):
        return "n/a (non-finite)"
    if mean < -999:
        return "< -999"
    spread = "> 999" if std is None or not np.isfinite(std) or std > 999 else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread}"


def protocol_cells(summary: Mapping[str, Any], digits: int = 3) -> list[str]:
    """"mean ± std" of a `summarise_folds` record: pooled R2, pooled PCC, per-gene PCC, per-gene R2."""
    return [_fmt(summary[proto][key], digits) for proto, key in _PROTOCOL_KEYS]


def format_table(rows: Mapping[str, Mapping[str, Any]], digits: int = 3) -> str:
    """Markdown table of fold summaries, one row per method, both protocols labelled.

    Args:
        rows: Method name -> `summarise_folds` result.
        digits: Decimals shown.

    Returns:
        A Markdown table with columns Method, pooled R2, pooled PCC, per-gene PCC, per-gene R2, map PCC (each
        "mean ± std" over folds, std with ddof=0; "—" for a summary without the maps protocol).
    """
    header = "| Method | pooled R2 | pooled PCC | per-gene PCC | per-gene R2 | map PCC |"
    sep = "|---|---|---|---|---|---|"
    lines = [header, sep]
    for method, summary in rows.items():
        maps = _fmt(summary["maps"]["pcc"], digits) if "maps" in summary else "—"
        lines.append(f"| {method} | " + " | ".join([*protocol_cells(summary, digits), maps]) + " |")
    return "\n".join(lines)
