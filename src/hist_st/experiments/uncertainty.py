"""Does a predicted standard deviation mean anything? Calibration of MC dropout and of a seed ensemble
(``hist-st bench uncertainty``; results and reading: ``docs/results/uncertainty.md``).

For every fold of cross-validation runs (``splits.json``, ``fold_<i>/model.pt``), each held-out slide is
predicted by **MC dropout** (``K`` passes of the first run's fold model with dropout on) and, with two or more
runs on the same folds and genes, by the **seed ensemble** (one deterministic pass of each run's fold model).
Both give per spot and gene a mean ``mu`` and a std ``sigma`` in log1p space, scored against
``y = log1p(counts)`` over all held-out spots and genes (`calibration`: rank correlation of ``sigma`` and
``|y - mu|``, coverage of the Gaussian central intervals ``mu +- z_p sigma``, ``calibration.png``, and the
error of the most and least confident deciles), also after recalibration out of fold: ``sigma`` of fold ``i``
times the factor that makes the 50% interval exact on the *other* folds' held-out entries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm, spearmanr

from hist_st.bench import markdown_table
from hist_st.errors import InputError
from hist_st.evaluate import fold_model
from hist_st.jsonio import write_json
from hist_st.pl import pyplot, save_figure
from hist_st.slide import read_cohort_slide
from hist_st.train.data import log1p_counts
from hist_st.train.predict import mc_log1p_samples, predict_log1p
from hist_st.train.splits import read_splits

__all__ = ["calibration", "run_uncertainty", "uncertainty_markdown", "LEVELS"]

LEVELS = np.round(np.arange(0.05, 1.0, 0.05), 2)  # central-interval probabilities of the calibration curve


def calibration(mu: np.ndarray, sigma: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Calibration of ``sigma`` for ``mu`` against ``y`` (arrays ``[N, G]``, log1p space).

    Returns:
        ``{"spearman", "spearman_per_gene_mean", "coverage_50", "coverage_90", "curve": {p: coverage},
        "mae_most_confident_decile", "mae_least_confident_decile", "mean_sigma", "mae", "n"}``.
    """
    err = np.abs(y - mu)
    s, e = sigma.ravel(), err.ravel()
    rho = float(spearmanr(s, e).statistic) if s.std() > 0 and e.std() > 0 else float("nan")
    per_gene = [spearmanr(sigma[:, g], err[:, g]).statistic for g in range(err.shape[1])
                if sigma[:, g].std() > 0 and err[:, g].std() > 0]
    rho_gene = float(np.nanmean(per_gene)) if per_gene else float("nan")
    curve = {float(p): float((e <= norm.ppf(0.5 + p / 2) * s).mean()) for p in LEVELS}
    order = np.argsort(s, kind="stable")
    k = max(1, len(order) // 10)
    return {"spearman": rho, "spearman_per_gene_mean": rho_gene, "coverage_50": curve[0.5],
            "coverage_90": curve[0.9], "curve": curve,  # central 50% and 90% intervals: both in LEVELS
            "mae_most_confident_decile": float(e[order[:k]].mean()),
            "mae_least_confident_decile": float(e[order[-k:]].mean()), "mean_sigma": float(s.mean()),
            "mae": float(e.mean()), "n": int(e.size)}


def _genes(run: Path) -> list[str]:
    path = run / "genes.txt"
    if not path.is_file():
        raise InputError(run, "has no genes.txt (a `hist-st cv` / `bench accuracy` run folder is expected)")
    return path.read_text().split()


def run_uncertainty(
    runs: Sequence[str | Path], cohort: str | Path, out: str | Path, *, mc_samples: int = 20, seed: int = 0
) -> dict[str, Any]:
    """MC dropout (first run) and seed-ensemble (all runs) calibration on the held-out folds.

    Raises:
        InputError: a run without splits/genes/fold models, runs whose folds or genes differ.
    """
    runs = [Path(r) for r in runs]
    if not runs:
        raise InputError("--run", "give at least one cross-validation run folder")
    cohort, out = Path(cohort), Path(out)
    folds = read_splits(runs[0] / "splits.json")
    genes = _genes(runs[0])
    for r in runs[1:]:
        other = read_splits(r / "splits.json")
        if [(sorted(f["train"]), sorted(f["test"])) for f in other] != [(sorted(f["train"]), sorted(f["test"])) for f in folds]:
            raise InputError(r, f"its folds differ from those of {runs[0]}; an ensemble needs the same folds")
        if _genes(r) != genes:
            raise InputError(r, f"its genes differ from those of {runs[0]}")
    names = ["mc_dropout"] + (["ensemble"] if len(runs) > 1 else [])
    per_fold: dict[str, list[tuple[np.ndarray, ...]]] = {n: [] for n in names}  # per fold: (mu, sigma, y)
    for f in folds:
        rows: dict[str, list[tuple[np.ndarray, ...]]] = {n: [] for n in names}
        bundles = [fold_model(r, f["fold"]) for r in runs]
        for sid in sorted(f["test"]):
            slide = read_cohort_slide(cohort / f"{sid}.h5ad")
            draws = {"mc_dropout": mc_log1p_samples(bundles[0], slide, mc_samples, seed=seed)}  # [K, N, G]
            if len(bundles) > 1:
                draws["ensemble"] = np.stack([predict_log1p(b, slide)[0] for b in bundles])
            y = log1p_counts(slide, genes)  # [N, G], the same truth for every method
            for n, d in draws.items():
                rows[n].append((d.mean(0), d.std(0), y))
        for n in names:
            per_fold[n].append(tuple(np.concatenate(col) for col in zip(*rows[n])))
    methods: dict[str, Any] = {}
    for n in names:
        mu, sigma, y = (np.concatenate(col) for col in zip(*per_fold[n]))
        methods[n] = calibration(mu, sigma, y)
        if len(per_fold[n]) > 1:  # each fold's sigma times the factor making the others' 50% intervals exact
            ratio = [(np.abs(t - m) / np.maximum(sd, 1e-12)).ravel() for m, sd, t in per_fold[n]]
            scaled = [f[1] * float(np.median(np.concatenate(ratio[:i] + ratio[i + 1:])) / norm.ppf(0.75))
                      for i, f in enumerate(per_fold[n])]
            methods[f"{n}_recalibrated"] = calibration(mu, np.concatenate(scaled), y)
    result = {"runs": [str(r) for r in runs], "cohort": str(cohort), "mc_samples": mc_samples,
              "n_genes": len(genes), "methods": methods}
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "uncertainty.json")
    _plot(result, out / "calibration.png")
    (out / "uncertainty.md").write_text(uncertainty_markdown(result))
    return result


def _plot(result: dict[str, Any], path: Path) -> Path:
    fig, ax = pyplot().subplots(1, 1, figsize=(4.2, 4.0), dpi=120)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
    for name, m in result["methods"].items():  # curve: LEVELS in ascending order
        ax.plot(list(m["curve"]), list(m["curve"].values()), marker="o", ms=3, label=name.replace("_", " "))
    ax.set(xlabel="nominal central-interval probability\n(Gaussian in log1p space)",
           ylabel="observed coverage on held-out spots")
    ax.set_title("uncertainty calibration", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def uncertainty_markdown(result: dict[str, Any]) -> str:
    """The calibration numbers as a Markdown table."""
    lines = markdown_table(
        ["method", "Spearman(std, abs error) pooled / per-gene mean", "coverage 50%", "coverage 90%",
         "MAE most / least confident decile", "mean std", "MAE"],
        ([name.replace("_", " "), f"{m['spearman']:.3f} / {m['spearman_per_gene_mean']:.3f}",
          f"{m['coverage_50']:.3f}", f"{m['coverage_90']:.3f}",
          f"{m['mae_most_confident_decile']:.3f} / {m['mae_least_confident_decile']:.3f}",
          f"{m['mean_sigma']:.4f}", f"{m['mae']:.3f}"] for name, m in result["methods"].items()))
    return "\n".join(lines) + "\n\n" + json.dumps({"runs": result["runs"], "mc_samples": result["mc_samples"]}) + "\n"
