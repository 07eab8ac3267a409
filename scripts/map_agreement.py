"""Do HiST's maps follow the measured ones on held-out slides? Every test slide of one or more CV runs.

A map shows each gene in log1p counts per 10k over the model's genes (``hist-st predict`` and ``hist-st plot
genes``' default, `hist_st.pl.normalise_counts`), so a spot's library size is divided out. For each fold of
each ``run_cv`` folder (``<bench accuracy out>/seed_<s>/<cohort>``, every fold with a ``model.pt``), the fold's
model predicts its test slides; per test slide:

- map r: Pearson, over the slide's spots, of each gene's predicted and measured normalised map, the mean over
  the genes that vary on the slide (`hist_st.metrics.map_metrics`, the "map PCC" of the accuracy tables);
- the same on log1p counts (what the accuracy tables score), for comparison;
- PC1 share: variance of all the model's normalised maps on their first principal component, predicted and
  measured (`hist_st.pl.pc1_share`; near 1 when one pattern drives every predicted map);
- measured PC1 ~ depth: |Pearson| over the slide's spots between the measured maps' first principal component
  and the spot's log library size (log1p of its counts over all genes): how much of what the maps are scored
  against still follows sequencing depth after normalisation.

Prints one row per folder (mean over its test slides) and, per slide, the mean over the folders.

Usage: ``python scripts/map_agreement.py COHORT RUN_CV_DIR [RUN_CV_DIR ...]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from hist_st.evaluate.cv import fold_model
from hist_st.jsonio import read_json
from hist_st.methods.base import log1p_targets
from hist_st.metrics import map_metrics, normalise_counts, pearson_columns
from hist_st.pl import pc1_share
from hist_st.slide import read_prepared
from hist_st.train.predict import predict_log1p

COLUMNS = ("map r (normalised)", "r on log1p counts", "PC1 share predicted", "PC1 share measured",
           "measured PC1 ~ depth")


def pc1_depth(maps: np.ndarray, slide) -> float:
    """|Pearson| between the first principal component of ``maps`` (spots x genes) and the spot's log library
    size over all of ``slide``'s genes."""
    u = np.linalg.svd(maps - maps.mean(0), full_matrices=False)[0][:, 0]
    return float(abs(np.corrcoef(u, np.log1p(np.asarray(slide.counts.sum(1)).ravel()))[0, 1]))


def slide_row(bundle, slide) -> tuple[float, ...]:
    """The `COLUMNS` of one held-out slide."""
    pred = predict_log1p(bundle, slide)[0].astype(np.float64)
    y = log1p_targets(slide, bundle.genes).astype(np.float64)
    counts = np.expm1(y)
    p_map, m_map = normalise_counts(np.expm1(pred)), normalise_counts(counts)
    varies = np.ptp(m_map, axis=0) > 0
    return (map_metrics(pred, counts)["pcc"],
            float(np.mean(pearson_columns(pred[:, varies], y[:, varies]))),
            pc1_share(p_map), pc1_share(m_map), pc1_depth(m_map, slide))


def run_rows(run: Path, slides: dict) -> dict[str, tuple]:
    """Slide id -> `COLUMNS`, for every test slide of every fold of ``run`` that has a model."""
    rows = {}
    for f in read_json(run / "splits.json")["folds"]:
        if (run / f"fold_{f['fold']}" / "model.pt").is_file():
            bundle = fold_model(run, f["fold"])
            rows.update({s: slide_row(bundle, slides[s]) for s in sorted(f["test"])})
    return rows


def main(cohort: str, *run_dirs: str) -> None:
    torch.set_num_threads(1)
    slides = {p.stem: read_prepared(p) for p in sorted(Path(cohort).glob("*.h5ad"))}
    per_run = {run: run_rows(Path(run), slides) for run in run_dirs}
    print("| run (mean over its test slides) | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for run, rows in per_run.items():
        print(f"| {run} | " + " | ".join(f"{v:.3f}" for v in np.mean(list(rows.values()), axis=0)) + " |")
    print("\n| test slide (mean over the runs) | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for s in sorted({s for rows in per_run.values() for s in rows}):
        vals = np.mean([rows[s] for rows in per_run.values() if s in rows], axis=0)
        print(f"| {s} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
