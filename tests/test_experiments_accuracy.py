"""End to end on a tiny synthetic cohort: bench accuracy (2 epochs, 2 folds), token export, gene plot, reuse
of identical runs and the report (Table 1 and Figure 3: tests/test_bench_efficiency.py)."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from hist_st.bench.efficiency import format_efficiency_table
from hist_st.cli import main
from hist_st.data.synthetic import make_cohort
from hist_st.errors import InputError

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


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_accuracy_adds_methods_without_retraining(tmp_path):
    """A second run with one more method keeps HiST and mean (same config/folds/genes) and runs only ridge;
    changing a baseline option or the HiST config reruns that method, and --force reruns all."""
    from hist_st.experiments.accuracy import run_accuracy

    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_slides=4, n_spots=(60, 90), n_genes=16, embed_dim=8, seed=3)
    out = tmp_path / "acc"
    kw = dict(genes="he:12", folds=2, seed=5, progress=False)
    first = run_accuracy([cohort], out, methods=["hist", "mean"], overrides=TINY, **kw)
    model = out / "cohort" / "fold_0" / "model.pt"
    stamp = model.stat().st_mtime_ns
    second = run_accuracy([cohort], out, methods=["hist", "mean", "ridge"], overrides=TINY, **kw)
    assert model.stat().st_mtime_ns == stamp  # HiST not retrained
    m1, m2 = first["cohorts"]["cohort"]["methods"], second["cohorts"]["cohort"]["methods"]
    assert list(m2) == ["HiST", "mean", "ridge"]
    devices = second["cohorts"]["cohort"]["devices"]  # what trained each row; kept rows keep theirs
    assert set(devices) == {"HiST", "mean", "ridge"} and devices["HiST"] == first["cohorts"]["cohort"]["devices"]["HiST"]
    assert all(d.startswith("CPU") for d in devices.values()) or torch_cuda()
    assert m2["HiST"] == m1["HiST"] and m2["mean"] == m1["mean"]
    for i in range(2):
        fold = json.loads((out / "cohort" / f"fold_{i}" / "metrics.json").read_text())
        assert set(fold["metrics"]) == {"HiST", "mean", "ridge"}
    top = json.loads((out / "cohort" / "metrics.json").read_text())
    assert set(top["methods"]) == {"HiST", "mean", "ridge"}

    # a different ridge option reruns ridge only; the result must match a fresh ridge-only run
    third = run_accuracy([cohort], out, methods=["hist", "mean", "ridge"], overrides=TINY,
                         baseline_options={"ridge": {"n_components": 4}}, **kw)
    assert model.stat().st_mtime_ns == stamp
    fresh = run_accuracy([cohort], tmp_path / "fresh", methods=["ridge"],
                         baseline_options={"ridge": {"n_components": 4}}, overrides=TINY, **kw)
    assert third["cohorts"]["cohort"]["methods"]["ridge"] == fresh["cohorts"]["cohort"]["methods"]["ridge"]
    assert third["cohorts"]["cohort"]["methods"]["ridge"] != m2["ridge"]

    # --rerun trains a kept method again (here to the same numbers) and keeps the others
    mean_json = out / "cohort" / "metrics.json"
    rerun = run_accuracy([cohort], out, methods=["hist", "mean", "ridge"], overrides=TINY, rerun=["mean"],
                         baseline_options={"ridge": {"n_components": 4}}, **kw)
    assert model.stat().st_mtime_ns == stamp and mean_json.is_file()
    assert rerun["cohorts"]["cohort"]["methods"] == third["cohorts"]["cohort"]["methods"]

    # another HiST config retrains HiST
    run_accuracy([cohort], out, methods=["hist", "mean"], overrides=[*TINY, "epochs=3"], **kw)
    assert model.stat().st_mtime_ns != stamp


def test_accuracy_copies_identical_methods_from_other_runs(tmp_path):
    """--reuse-from copies a method computed by a separate run with the same cohort, folds, genes and options
    (per-fold metrics, per-gene CSV, device, source), replaces a stale row of that method, and ignores runs
    that differ in options or genes."""
    from hist_st.experiments.accuracy import run_accuracy

    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_slides=4, n_spots=(60, 90), n_genes=16, embed_dim=8, seed=3)
    kw = dict(genes="he:12", folds=2, seed=5, progress=False, overrides=TINY)
    ridge4 = {"ridge": {"n_components": 4}}
    alone = run_accuracy([cohort], tmp_path / "ridge4", methods=["ridge"], baseline_options=ridge4, **kw)
    run_accuracy([cohort], tmp_path / "ridge-he10", methods=["ridge"], baseline_options=ridge4,
                 **{**kw, "genes": "he:10"})
    reference = run_accuracy([cohort], tmp_path / "ref", methods=["mean", "ridge"], baseline_options=ridge4, **kw)

    # a fresh folder: mean is trained, ridge copied (the he:10 run does not match and is skipped)
    out = tmp_path / "acc"
    res = run_accuracy([cohort], out, methods=["mean", "ridge"], baseline_options=ridge4,
                       reuse_from=[tmp_path / "ridge-he10", tmp_path / "ridge4"], **kw)
    c = res["cohorts"]["cohort"]
    assert c["reused_from"] == {"ridge": str(tmp_path / "ridge4")}
    assert c["methods"] == reference["cohorts"]["cohort"]["methods"]
    assert c["methods"]["ridge"] == alone["cohorts"]["cohort"]["methods"]["ridge"]
    assert c["devices"]["ridge"] == alone["cohorts"]["cohort"]["devices"]["ridge"]
    for f in ("splits.json", "genes.txt"):
        assert (out / "cohort" / f).read_text() == (tmp_path / "ref" / "cohort" / f).read_text()
    for i in range(2):
        got = json.loads((out / "cohort" / f"fold_{i}" / "metrics.json").read_text())
        want = json.loads((tmp_path / "ref" / "cohort" / f"fold_{i}" / "metrics.json").read_text())
        assert got == want
    assert (out / "per_gene.csv").read_text() == (tmp_path / "ref" / "per_gene.csv").read_text()

    # a stale ridge row (other options) in the output folder is replaced by the matching copy, mean kept
    stale = tmp_path / "stale"
    run_accuracy([cohort], stale, methods=["mean", "ridge"], **kw)
    mean_stamp = (stale / "cohort" / "fold_0" / "metrics.json").read_text()
    res = run_accuracy([cohort], stale, methods=["mean", "ridge"], baseline_options=ridge4,
                       reuse_from=[tmp_path / "ridge4"], **kw)
    assert res["cohorts"]["cohort"]["methods"] == reference["cohorts"]["cohort"]["methods"]
    fold = json.loads((stale / "cohort" / "fold_0" / "metrics.json").read_text())
    assert fold["metrics"]["mean"] == json.loads(mean_stamp)["metrics"]["mean"]
    assert fold == json.loads((tmp_path / "ref" / "cohort" / "fold_0" / "metrics.json").read_text())
    # the copy is remembered: a later run without --reuse-from keeps ridge and still names its source
    again = run_accuracy([cohort], stale, methods=["mean", "ridge"], baseline_options=ridge4, **kw)
    assert again["cohorts"]["cohort"]["reused_from"] == {"ridge": str(tmp_path / "ridge4")}
    # other options than the source's: ridge is trained, nothing copied
    res = run_accuracy([cohort], tmp_path / "acc2", methods=["ridge"], reuse_from=[tmp_path / "ridge4"], **kw)
    assert res["cohorts"]["cohort"]["reused_from"] == {}
    assert res["cohorts"]["cohort"]["methods"]["ridge"] != alone["cohorts"]["cohort"]["methods"]["ridge"]
    with pytest.raises(InputError, match="no accuracy.json"):
        run_accuracy([cohort], tmp_path / "acc3", methods=["ridge"], reuse_from=[cohort], **kw)


def test_accuracy_split_over_runs_by_fold(tmp_path, capsys):
    """--only-folds trains only the named folds of the unchanged split (a table over those folds, saying so);
    a full run reusing two such runs trains nothing and equals a run that trained every fold itself."""
    from hist_st.experiments.accuracy import run_accuracy

    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_slides=6, n_spots=(60, 90), n_genes=16, embed_dim=8, seed=3)
    kw = dict(methods=["mean", "ridge"], baseline_options={"ridge": {"n_components": 4}}, genes="he:12",
              folds=3, seed=5, progress=False)
    whole = run_accuracy([cohort], tmp_path / "whole", **kw)
    part = run_accuracy([cohort], tmp_path / "part", only_folds=[2], **kw)
    rest = run_accuracy([cohort], tmp_path / "rest", only_folds=[1, 0], **kw)

    def fold_values(res):
        return {m: s["per_gene"]["pcc"]["values"] for m, s in res["cohorts"]["cohort"]["methods"].items()}

    assert {m: v for m, v in fold_values(part).items()} == {m: v[2:] for m, v in fold_values(whole).items()}
    assert fold_values(rest) == {m: v[:2] for m, v in fold_values(whole).items()}
    assert "3-fold, seed 5; folds 2 only" in part["table"] and part["only_folds"] == [2]
    assert "Mean ± std over folds 2 of 3." in (tmp_path / "part" / "cohort" / "table.md").read_text()
    splits = json.loads((tmp_path / "part" / "cohort" / "splits.json").read_text())
    assert splits["k"] == 3 and splits["only_folds"] == [2] and [f["fold"] for f in splits["folds"]] == [2]
    assert not (tmp_path / "part" / "cohort" / "fold_0").exists()

    merged = run_accuracy([cohort], tmp_path / "merged", reuse_from=[tmp_path / "part", tmp_path / "rest"], **kw)
    assert merged["cohorts"]["cohort"]["methods"] == whole["cohorts"]["cohort"]["methods"]
    assert merged["cohorts"]["cohort"]["reused_from"] == {}  # mixed sources: no single origin to name
    for i in range(3):
        got = json.loads((tmp_path / "merged" / "cohort" / f"fold_{i}" / "metrics.json").read_text())
        assert got == json.loads((tmp_path / "whole" / "cohort" / f"fold_{i}" / "metrics.json").read_text())
    with pytest.raises(InputError, match=r"--only-folds.*no fold 3: the split has folds \[0, 1, 2\]"):
        run_accuracy([cohort], tmp_path / "bad", only_folds=[3], **kw)
    with pytest.raises(InputError, match="name at least one fold"):
        run_accuracy([cohort], tmp_path / "bad", only_folds=[], **kw)
    cli = ["bench", "accuracy", "--cohort", str(cohort), "--out", str(tmp_path / "cli"), "--methods", "mean",
           "--genes", "he:12", "--folds", "3", "--seed", "5", "--no-progress"]
    assert main([*cli, "--only-folds", "1,x"]) == 2
    assert "--only-folds: '1,x' is not a comma-separated list of fold numbers" in capsys.readouterr().err
    assert main([*cli, "--only-folds", "1"]) == 0
    assert json.loads((tmp_path / "cli" / "accuracy.json").read_text())["only_folds"] == [1]


def test_reused_hist_folds_bring_their_predictions(tmp_path, monkeypatch):
    """HiST folds found with --reuse-from are not trained again: their prediction files are copied from the
    folder that computed them. Where that folder lacks them, the fold is trained (the result folder must hold
    the predictions its table was made from)."""
    from hist_st.experiments.accuracy import run_accuracy
    from hist_st.methods.hist import HiSTMethod

    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_slides=4, n_spots=(60, 90), n_genes=16, embed_dim=8, seed=3)
    kw = dict(methods=["hist"], overrides=TINY, genes="he:12", folds=2, seed=5, progress=False)
    first = run_accuracy([cohort], tmp_path / "first", only_folds=[1], **kw)
    fits = []
    real_fit = HiSTMethod.fit
    monkeypatch.setattr(HiSTMethod, "fit", lambda self, *a, **k: fits.append(1) or real_fit(self, *a, **k))

    again = run_accuracy([cohort], tmp_path / "again", only_folds=[1], reuse_from=[tmp_path / "first"], **kw)
    assert fits == []
    assert again["cohorts"]["cohort"]["methods"] == first["cohorts"]["cohort"]["methods"]
    src = sorted((tmp_path / "first" / "cohort" / "fold_1" / "predictions").glob("*.h5ad"))
    dst = sorted((tmp_path / "again" / "cohort" / "fold_1" / "predictions").glob("*.h5ad"))
    assert src and [p.name for p in dst] == [p.name for p in src]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(src, dst))
    assert not list((tmp_path / "again" / "cohort" / "fold_1" / "predictions").glob(".*.tmp"))

    src[0].unlink()  # the computing folder lost a prediction: that fold trains again, fold 0 (absent) too
    run_accuracy([cohort], tmp_path / "third", reuse_from=[tmp_path / "first"], **kw)
    assert len(fits) == 2


def test_ablation_and_stain_rows_reuse_identical_runs(tmp_path):
    """Table 3's full row and Table 5's token-only row come from Table 2's HiST run only when the config,
    cohort, folds and genes are identical; otherwise they are trained."""

    from hist_st.experiments.ablation import run_ablation
    from hist_st.experiments.accuracy import CVSetup, run_accuracy
    from hist_st.experiments.stain import run_stain

    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_slides=4, n_spots=(60, 90), n_genes=16, embed_dim=8, seed=3)
    kw = dict(genes="he:12", folds=2, seed=5, progress=False)
    acc = run_accuracy([cohort], tmp_path / "acc", methods=["hist"], overrides=TINY, **kw)
    hist_run = tmp_path / "acc" / "cohort"
    hist = acc["cohorts"]["cohort"]["methods"]["HiST"]

    same = CVSetup(overrides=TINY, **kw)
    abl = run_ablation(cohort, tmp_path / "abl", setup=same, names=["full"], reuse_from=[hist_run])
    assert abl["summaries"]["full"] == hist
    assert json.loads((tmp_path / "abl" / "reused.json").read_text()) == {"full": str(hist_run)}
    assert not (tmp_path / "abl" / "full" / "fold_0" / "model.pt").exists()  # not trained

    # one more epoch: not the same run, so the row is trained
    run_ablation(cohort, tmp_path / "abl3", setup=CVSetup(overrides=[*TINY, "epochs=3"], **kw), names=["full"],
                 reuse_from=[hist_run])
    assert json.loads((tmp_path / "abl3" / "reused.json").read_text()) == {}
    assert (tmp_path / "abl3" / "full" / "metrics.json").is_file()
    # other folds or genes than Table 2's: trained too
    run_ablation(cohort, tmp_path / "abl-seed", setup=dataclasses.replace(same, seed=6), names=["full"],
                 reuse_from=[hist_run])
    run_ablation(cohort, tmp_path / "abl-genes", setup=dataclasses.replace(same, genes="he:11"), names=["full"],
                 reuse_from=[hist_run])
    for d in ("abl-seed", "abl-genes"):
        assert json.loads((tmp_path / d / "reused.json").read_text()) == {}

    # Table 5's token-only row on the same cohort is Table 2's run; the Macenko cohort row is trained
    st = run_stain(cohort, cohort, tmp_path / "stain", setup=same, rows=["token-only", "both"], reuse_from=[hist_run])
    assert st["summaries"]["token-only"] == hist
    reused = json.loads((tmp_path / "stain" / "reused.json").read_text())
    assert set(reused) == {"token-only", "both"}  # the "Macenko" cohort here is the same folder
    assert "reused from runs with the same config" in (tmp_path / "stain" / "table.md").read_text()


def test_report_end_to_end_and_rerun_adds_a_method(tmp_path):
    """`hist-st report` writes every table it was asked for, with figures beside the Markdown; a second
    call with one more method trains only that method and reuses Table 3's full row from Table 2."""
    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_slides=4, n_spots=(60, 90), n_genes=16, embed_dim=8, seed=3)
    args = ["report", "--cohort", str(cohort), "--name", "tiny", "--docs", str(tmp_path / "docs"), "--runs",
            str(tmp_path / "runs"), "--gene-sets", "he:12", "--folds", "2", "--seed", "5", "--ablations",
            "no-token", "--no-efficiency", "--macenko", str(cohort), "--token-groups", "patient", "--no-progress",
            *TINY]
    assert main([*args, "--methods", "hist,mean"]) == 0
    md = (tmp_path / "docs" / "tiny.md").read_text()
    for heading in ("## Table 2", "## Table 3", "## Table 5", "## Table 6", "## Gene maps"):
        assert heading in md
    assert "| HiST |" in md and "| mean |" in md and "`no-token`" in md
    assert "`full` from" in md  # Table 3's full model is Table 2's HiST run
    for png in ("genes.png", "token_pca_patient.png", "loss_curves.png"):
        assert (tmp_path / "docs" / "tiny" / png).read_bytes()[:4] == b"\x89PNG"
    model = tmp_path / "runs" / "accuracy-he12" / "cohort" / "fold_0" / "model.pt"
    stamp = model.stat().st_mtime_ns
    # A Table 1 measured elsewhere (say on a GPU) is shown with its own device and command.
    gpu = tmp_path / "gpu-eff"
    gpu.mkdir()
    rec = {"method": "hist", "device": "cuda", "max_train_spots": 1000, "train_s_per_slide": 0.01,
           "infer_s_per_slide": 0.002, "train_alloc_gb": 1.0, "train_reserved_gb": 2.0, "infer_reserved_gb": 0.5,
           "n_genes": 12}
    (gpu / "efficiency.json").write_text(json.dumps({
        "records": [rec], "table": format_efficiency_table([rec]), "device": "Test GPU (CUDA)",
        "header": "Efficiency (Table 1) on Test GPU (CUDA).", "command": "hist-st bench efficiency --device cuda"}))
    # ridge computed separately (same folds, genes, options) is copied in; a run on other genes is not used
    separate = ["bench", "accuracy", "--cohort", str(cohort), "--methods", "ridge", "--folds", "2", "--seed", "5",
                "--baseline-option", "ridge.n_components=4", "--no-progress"]
    assert main([*separate, "--out", str(tmp_path / "ridge"), "--genes", "he:12"]) == 0
    assert main([*separate, "--out", str(tmp_path / "ridge10"), "--genes", "he:10"]) == 0
    assert main([*args, "--methods", "hist,mean,ridge", "--baseline-option", "ridge.n_components=4",
                 "--efficiency-also", str(gpu), "--reuse-from", str(tmp_path / "ridge10"),
                 "--reuse-from", str(tmp_path / "ridge")]) == 0
    assert model.stat().st_mtime_ns == stamp
    md = (tmp_path / "docs" / "tiny.md").read_text()
    assert "| ridge |" in md and "ridge: n_components=4" in md
    assert f"Row `ridge` copied from a separate run with the same cohort, folds, genes and options, not trained " \
           f"by this command: `{tmp_path / 'ridge'}`, made by `hist-st " in md  # (the command line: pytest's here)
    assert f"Not used by Table 2 (no method there with the same cohort, folds, genes and options): " \
           f"`{tmp_path / 'ridge10'}`." in md
    assert "Trained on: HiST, mean, ridge: CPU" in md or torch_cuda()
    assert "### Table 1 on Test GPU (CUDA)" in md and "`hist-st bench efficiency --device cuda`" in md
    assert "| hist | 0.010 | 0.002 | 1.00 (1.00) | 2.00 (2.00) | 0.50 |" in md
