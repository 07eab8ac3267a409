"""What HiST's per-gene predictions are made of, by fifths of the genes' expression level.

For each fold of one or more `run_cv` folders (``<bench accuracy out>/seed_<s>/<cohort>``; a fold is taken
from the first folder that has its ``fold_<i>/model.pt``), the fold's model predicts its test slides
(log1p, unclipped, as the metrics see them) and its training slides. Per gene, over the test spots:

- HiST: its per-gene Pearson (the table's number);
- depth part: Pearson of the spot's mean prediction over all genes (one number per spot, HiST's own
  depth signal), signed by the gene's slope on it over the training spots;
- rest: Pearson of what is left of the gene's prediction after its least-squares share of that one
  number is taken out, and that rest's share of the prediction's variance;
- head row norm: the length of the gene's row of the linear head.

Usage: ``python scripts/head_noise.py COHORT RUN_CV_DIR [RUN_CV_DIR ...]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from hist_st.evaluate.cv import fold_model
from hist_st.evaluate.strata import expression_level
from hist_st.jsonio import read_json
from hist_st.methods.base import log1p_targets
from hist_st.metrics import pearson_columns
from hist_st.slide import read_prepared
from hist_st.train.predict import predict_log1p

COLUMNS = {"hist": "HiST per-gene PCC", "depth": "depth part (HiST's mean prediction over genes), PCC",
           "rest": "rest of the prediction, PCC", "rest_share": "rest's share of the prediction variance",
           "row_norm": "head row norm"}


def fold_parts(run_dir: Path, fold: dict, slides: dict, genes: list[str]) -> dict[str, np.ndarray]:
    """Per-gene values of one fold (NaN where the gene is constant on the test spots)."""
    bundle = fold_model(run_dir, fold["fold"])
    if bundle.genes != genes:
        raise SystemExit(f"{run_dir}: fold {fold['fold']} predicts other genes than the first fold")

    def stack(ids, fn):
        return np.concatenate([fn(slides[s]) for s in sorted(ids)]).astype(np.float64)

    pred = stack(fold["test"], lambda s: predict_log1p(bundle, s)[0])  # [N, G]
    y = stack(fold["test"], lambda s: log1p_targets(s, genes))
    train_pred = stack(fold["train"], lambda s: predict_log1p(bundle, s)[0])
    train_y = stack(fold["train"], lambda s: log1p_targets(s, genes))
    depth, train_depth = pred.mean(1), train_pred.mean(1)  # HiST's own depth signal, one number per spot
    d = train_depth - train_depth.mean()
    sign = np.sign(d @ (train_y - train_y.mean(0)))  # [G] each gene's slope on it, over the training spots
    centred, dc = pred - pred.mean(0), depth - depth.mean()
    rest = centred - np.outer(dc, dc @ centred / (dc @ dc))
    constant = np.ptp(y, axis=0) == 0
    out = {"hist": pearson_columns(pred, y),
           "depth": sign * pearson_columns(np.repeat(depth[:, None], len(genes), 1), y),
           "rest": pearson_columns(rest, y),
           "rest_share": rest.var(0) / np.maximum(centred.var(0), 1e-30),
           "row_norm": bundle.model.head.weight.detach().double().norm(dim=1).cpu().numpy()}
    for v in out.values():
        v[constant] = np.nan
    return out


def main(cohort: str, *run_dirs: str) -> None:
    torch.set_num_threads(1)
    slides = {p.stem: read_prepared(p) for p in sorted(Path(cohort).glob("*.h5ad"))}
    folds = {}
    for run in map(Path, run_dirs):
        for f in read_json(run / "splits.json")["folds"]:
            if (run / f"fold_{f['fold']}" / "model.pt").is_file():
                folds.setdefault(f["fold"], (run, f))
    first = folds[min(folds)][0]
    genes = [g for g in (first / "genes.txt").read_text().split() if g]
    level = expression_level(slides.values(), genes)
    parts = [fold_parts(run, f, slides, genes) for _, (run, f) in sorted(folds.items())]
    values = {k: np.array([p[k] for p in parts]) for k in COLUMNS}  # [folds, G]
    print(f"folds {sorted(folds)}; mean over folds and the genes of each fifth")
    print("| genes by mean expression | " + " | ".join(COLUMNS.values()) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    groups = np.array_split(np.argsort(level, kind="stable"), 5)
    for i, idx in enumerate(groups):
        print(f"| {i + 1} of 5 | " + " | ".join(f"{np.nanmean(values[k][:, idx]):.3f}" for k in COLUMNS) + " |")
    print("| all | " + " | ".join(f"{np.nanmean(values[k]):.3f}" for k in COLUMNS) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
