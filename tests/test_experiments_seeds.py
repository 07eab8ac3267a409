"""bench accuracy --seeds: one run per training seed on the same folds, rows = means over seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hist_st.cli import main
from hist_st.data.synthetic import make_cohort
from hist_st.errors import InputError
from hist_st.experiments.seeds import paired_differences, run_accuracy_seeds, seed_summary

TINY = ["epochs=2", "model.dim=16", "model.heads=2", "model.levels=11-1", "progress=false"]


def test_seed_statistics_against_hand_computation():
    v = np.array([[0.1, 0.4, 0.3], [0.2, 0.2, 0.5]])  # 2 seeds x 3 folds
    s = seed_summary(v)
    fold_means = np.array([0.15, 0.3, 0.4])
    assert s["mean"] == pytest.approx(fold_means.mean()) and s["std"] == pytest.approx(fold_means.std())
    assert s["seed_std"] == pytest.approx(np.std([0.8 / 3, 0.9 / 3]))
    d = paired_differences(v, v[::-1])  # seed 0 - seed 1 and vice versa: fold means of D are 0
    assert d["mean"] == pytest.approx(0.0) and d["folds_ahead"] == 3
    d = paired_differences(v, v - np.array([0.1, -0.2, 0.0]))
    assert d["per_fold"] == pytest.approx([0.1, -0.2, 0.0]) and d["folds_ahead"] == 2
    with pytest.raises(ValueError):
        paired_differences(v, v[:1])


def test_accuracy_seeds_end_to_end(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    make_cohort(cohort, n_slides=4, n_spots=(60, 90), n_genes=16, embed_dim=8, seed=3)
    out = tmp_path / "acc"
    args = ["bench", "accuracy", "--cohort", str(cohort), "--out", str(out), "--methods", "hist,mean",
            "--genes", "he:12", "--folds", "2", "--seed", "5", "--no-progress", "--seeds", "5,6", *TINY]
    assert main(args) == 0
    assert "Paired per-fold differences, HiST minus method" in capsys.readouterr().out
    rec = json.loads((out / "seeds.json").read_text())
    splits = [json.loads((out / f"seed_{s}" / "cohort" / "splits.json").read_text())["folds"] for s in (5, 6)]
    assert [(f["train"], f["test"]) for f in splits[0]] == [(f["train"], f["test"]) for f in splits[1]]
    runs = [json.loads((out / f"seed_{s}" / "accuracy.json").read_text()) for s in (5, 6)]
    assert runs[0]["train_seed"] is None and runs[1]["train_seed"] == 6  # seed 5 is an ordinary run
    cfgs = [json.loads(json.dumps(r["config"])) for r in runs]
    assert cfgs[0]["seed"] == 5 and cfgs[1]["seed"] == 6
    hist = [r["cohorts"]["cohort"]["methods"]["HiST"]["per_gene"]["pcc"]["values"] for r in runs]
    assert hist[0] != hist[1]  # another training seed, another model
    row = rec["cohorts"]["cohort"]["methods"]["HiST"]["per-gene PCC"]
    np.testing.assert_allclose(row["fold_means"], np.mean(hist, axis=0))
    maps = [r["cohorts"]["cohort"]["methods"]["HiST"]["maps"]["pcc"]["values"] for r in runs]
    np.testing.assert_allclose(rec["cohorts"]["cohort"]["methods"]["HiST"]["map PCC"]["values"], maps)
    mean_vals = [r["cohorts"]["cohort"]["methods"]["mean"]["per_gene"]["pcc"]["values"] for r in runs]
    diff = rec["cohorts"]["cohort"]["paired"]["mean"]["per-gene PCC"]
    np.testing.assert_allclose(diff["per_fold"], np.mean(np.array(hist) - np.array(mean_vals), axis=0))
    # a second call keeps every seed's methods (same config, folds, genes): nothing retrained
    model = out / "seed_6" / "cohort" / "fold_0" / "model.pt"
    stamp = model.stat().st_mtime_ns
    assert main(args) == 0
    assert model.stat().st_mtime_ns == stamp
    # runs of one seed each (here copied from the first run) merge into one table, training nothing
    singles = []
    for s in ("5", "6"):
        singles.append(tmp_path / f"only{s}")
        one = [a if a != str(out) else str(singles[-1]) for a in args]
        assert main([*one[:one.index("--seeds")], "--seeds", s, *TINY, "--reuse-from", str(out)]) == 0
    merged = tmp_path / "merged"
    two = [a if a != str(out) else str(merged) for a in args]
    assert main([*two, "--reuse-from", str(singles[0]), "--reuse-from", str(singles[1])]) == 0
    assert not list(merged.rglob("model.pt"))
    got = json.loads((merged / "seeds.json").read_text())["cohorts"]["cohort"]["methods"]["HiST"]["per-gene PCC"]
    np.testing.assert_allclose(got["values"], row["values"])
    # another HiST config on the same seeds and folds, paired with the first run
    other = tmp_path / "acc-other"
    args2 = [a if a != str(out) else str(other) for a in args]
    args2 = [a for a in args2 if a != "hist,mean"]
    args2.insert(args2.index("--methods") + 1, "hist")
    assert main([*args2, "epochs=3", "--paired-with", str(out)]) == 0
    rec2 = json.loads((other / "seeds.json").read_text())["cohorts"]["cohort"]
    d = rec2["paired_with"][str(out)]["pooled PCC"]
    mine = np.array(rec2["methods"]["HiST"]["pooled PCC"]["values"])
    theirs = np.array(rec["cohorts"]["cohort"]["methods"]["HiST"]["pooled PCC"]["values"])
    np.testing.assert_allclose(d["per_fold"], (mine - theirs).mean(0))
    capsys.readouterr()
    assert main([*args2, "epochs=3", "--seeds", "5", "--paired-with", str(out)]) == 0  # a subset of its seeds
    one = json.loads((other / "seeds.json").read_text())["cohorts"]["cohort"]["paired_with"][str(out)]
    np.testing.assert_allclose(one["pooled PCC"]["per_fold"], mine[0] - theirs[0])
    # a run from before the maps protocol (no map PCC in its seeds.json) pairs on the other metrics
    old = json.loads((out / "seeds.json").read_text())
    old["cohorts"]["cohort"]["methods"]["HiST"].pop("map PCC")
    (out / "seeds.json").write_text(json.dumps(old))
    assert main([*args2, "epochs=3", "--paired-with", str(out)]) == 0
    assert set(json.loads((other / "seeds.json").read_text())["cohorts"]["cohort"]["paired_with"][str(out)]) == {
        "pooled R2", "pooled PCC", "per-gene PCC", "per-gene R2"}
    assert (other / "table.md").read_text().splitlines()[-1].endswith("| — |")
    assert main([*args2, "--seeds", "5,7", "--paired-with", str(out)]) == 2  # a seed the other lacks: refused
    assert "trained with seeds [5, 6], lacks seed(s) [7] of this run" in capsys.readouterr().err
    assert main([*args[:-len(TINY) - 2], "--seeds", "1,x", *TINY]) == 2
    assert "--seeds: '1,x' is not a comma-separated list of integers" in capsys.readouterr().err
    with pytest.raises(InputError, match="repeated training seed"):
        run_accuracy_seeds([cohort], out, seeds=[1, 1])
