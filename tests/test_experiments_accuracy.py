"""End to end on a tiny synthetic cohort: bench accuracy (2 epochs, 2 folds), token export, gene plot,
and the efficiency measurement in-process."""

from __future__ import annotations

import csv
import json

import numpy as np

from hist_st.cli import main
from hist_st.data.synthetic import make_cohort

TINY = ["epochs=2", "model.dim=16", "model.heads=2", "model.levels=11-1", "progress=false"]


def _acc_run(root):
    cohort = root / "cohort"
    make_cohort(cohort, n_slides=4, n_spots=(60, 90), n_genes=16, embed_dim=8, seed=3)
    out = root / "acc"
    rc = main(["bench", "accuracy", "--cohort", str(cohort), "--out", str(out), "--methods", "hist,mean,ridge",
               "--genes", "he:12", "--folds", "2", "--seed", "5", "--no-progress", *TINY])
    assert rc == 0
    return cohort, out


def test_accuracy_tokens_plot(tmp_path):
    """One tiny run (xdist would repeat a shared fixture per worker): outputs, then tokens and gene plot."""
    cohort, out = _acc_run(tmp_path)
    res = json.loads((out / "accuracy.json").read_text())
    methods = res["cohorts"]["cohort"]["methods"]
    assert list(methods) == ["HiST", "mean", "ridge"]
    for s in methods.values():
        for proto, key in (("pooled", "r2"), ("pooled", "pcc"), ("per_gene", "pcc"), ("per_gene", "r2")):
            assert len(s[proto][key]["values"]) == 2
            assert s[proto][key]["std"] is not None
    run = out / "cohort"
    splits = json.loads((run / "splits.json").read_text())
    assert splits["seed"] == 5 and len(splits["folds"]) == 2
    for i in range(2):
        fold = json.loads((run / f"fold_{i}" / "metrics.json").read_text())
        assert set(fold["metrics"]) == {"HiST", "mean", "ridge"}
        assert fold["n_genes"] == 12
    table = (out / "table.md").read_text()
    assert "pooled R2" in table and "| HiST |" in table and "| ridge |" in table
    with open(out / "per_gene.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * 12
    assert {"pcc_mean", "pcc_fold0", "pcc_fold1"} <= set(rows[0])
    # the mean baseline's per-gene PCC is 0 (constant prediction) wherever the gene was evaluated
    assert all(float(r["pcc_mean"]) == 0.0 for r in rows if r["method"] == "mean" and r["pcc_mean"])

    rc = main(["tokens", "--run", str(out / "cohort"), "--cohort", str(cohort), "--out", str(tmp_path / "tok"),
               "--group-by", "patient,technology"])
    assert rc == 0
    m = json.loads((tmp_path / "tok" / "token_metrics.json").read_text())["metrics"]
    assert set(m) == {"patient", "technology"} and m["patient"]["n_slides"] == 4
    tok = np.load(tmp_path / "tok" / "tokens.npz")
    assert tok["tokens"].shape == (4, 16) and np.isfinite(tok["tokens"]).all()
    assert (tmp_path / "tok" / "token_pca_patient.png").stat().st_size > 0

    pred = sorted((out / "cohort" / "fold_0" / "predictions").glob("*.h5ad"))[0]
    genes = (out / "cohort" / "genes.txt").read_text().split()[:2]
    png = tmp_path / "genes.png"
    assert main(["plot", "genes", "--pred", str(pred), "--genes", ",".join(genes), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_efficiency_measure_in_process():
    from hist_st.experiments.efficiency import format_efficiency_table, measure

    data = {"synthetic": {"n_train": 2, "n_test": 1, "n_spots": 60, "n_genes": 10, "embed_dim": 8, "seed": 0}}
    recs = [measure({"method": m, "data": data, "epochs": 1, "overrides": TINY[1:], "device": "cpu"})
            for m in ("hist", "mean")]
    for r in recs:
        assert r["train_s_per_slide"] > 0 and r["infer_s_per_slide"] > 0
        assert r["train_rss_peak_gb"] > 0 and r["n_genes"] == 10
    table = format_efficiency_table(recs + [{"method": "stflow", "error": "timeout"}])
    assert "| hist |" in table and "failed: timeout" in table
