"""`hist-st demo` on a miniature cohort: every output is written and the table has all methods."""

from __future__ import annotations

import json

from hist_st.demo import run_demo


def test_demo_miniature(tmp_path):
    result = run_demo(tmp_path, n_slides=4, n_spots=(80, 120), n_genes=30, n_top=8, epochs=1, folds=2,
                      overrides=["model.dim=32", "model.heads=4"], progress=False)
    for name in ("table.md", "loss_curves.png", "heatmap.png", "demo.json", "cv/splits.json", "cv/metrics.json"):
        assert (tmp_path / name).is_file(), name
    table = (tmp_path / "table.md").read_text()
    for row in ("HiST", "Ridge probe", "Gene-mean floor", "pooled R2", "per-gene PCC"):
        assert row in table
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["seconds"]["total"] > 0 and set(result["summary"]) == {"HiST", "Ridge probe (per spot)", "Gene-mean floor"}
