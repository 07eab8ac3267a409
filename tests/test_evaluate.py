"""`hist_st.evaluate`: a plan computed once and run_cv(plan, methods), HiST being one method among the others."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hist_st.cohort import CohortManifest
from hist_st.evaluate import make_plan, run_cv
from hist_st.jsonio import to_jsonable
from hist_st.methods import HiSTMethod, get_method, list_methods
from hist_st.metrics import evaluate_fold
from hist_st.train.config import GeneConfig, load_config
from hist_st.train.data import gene_counts, load_slides, select_genes
from hist_st.train.folds import make_folds
from hist_st.train.loop import train
from hist_st.train.predict import predict_log1p
from hist_st.train.toy import write_toy_cohort

TINY = ["model.dim=16", "model.heads=2", "model.levels=11-1", "epochs=2", "progress=false"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_toy_cohort(tmp_path_factory.mktemp("toy"), n_slides=4, n_spots=50, n_genes=10, dim=8)


def test_plan_is_the_folds_and_genes_of_the_parts(cohort):
    slides = load_slides(cohort)
    genes = GeneConfig.from_spec("he:5")
    plan = make_plan(cohort, genes, k=2, seed=3, group_by="patient")
    groups = {s.slide_id: s.patient for s in slides}
    assert plan.folds == make_folds(sorted(groups), 2, 3, groups)
    assert plan.genes == select_genes(slides, genes, CohortManifest.read(cohort)) == plan.fold_genes[0]
    assert plan.embedding == "toy" and plan.k == 2 and plan.group_by == "patient"
    train_only = GeneConfig(n_top=4, scope="train-only")
    per_fold = make_plan(cohort, train_only, k=2, seed=3)
    assert per_fold.genes is None
    for f in per_fold.folds:
        assert per_fold.fold_genes[f["fold"]] == select_genes(per_fold.train_slides(f), train_only, None)


def test_hist_is_one_method_and_matches_training_directly(cohort, tmp_path):
    assert {"hist", "mean", "ridge"} <= set(list_methods())
    cfg = load_config(None, TINY)
    slides = load_slides(cohort)
    genes = [str(g) for g in slides[0].genes[:6]]
    model = get_method("hist", config=cfg).fit(slides[:3], genes, "toy", seed=cfg.seed, out_dir=tmp_path / "a")
    assert isinstance(model, HiSTMethod) and (tmp_path / "a" / "model.pt").is_file()
    direct = train(cfg, slides[:3], out_dir=tmp_path / "b", genes=genes, overwrite=True)
    np.testing.assert_array_equal(model.predict(slides[3]), predict_log1p(direct.bundle, slides[3])[0])
    assert [h["loss"] for h in model.history_] == [h["loss"] for h in direct.history]


def test_run_cv_scores_every_method_alike(cohort, tmp_path):
    plan = make_plan(cohort, GeneConfig.from_spec("hvg:5"), k=2, seed=1)
    res = run_cv(plan, [get_method("mean"), get_method("ridge")], tmp_path / "cv", seed=1, progress=False)
    assert list(res.methods) == ["mean", "ridge"] and res.histories == {}
    assert json.loads((tmp_path / "cv" / "metrics.json").read_text()) == to_jsonable(res.to_json())
    assert [json.loads((tmp_path / "cv" / f"fold_{r.fold}" / "metrics.json").read_text()) for r in res.folds] == \
        [to_jsonable(r.to_json()) for r in res.folds]
    assert not (tmp_path / "cv" / "config.yaml").exists()  # no HiST, no HiST config
    assert (tmp_path / "cv" / "genes.txt").read_text().split() == plan.genes
    for f in plan.folds:
        rec = json.loads((tmp_path / "cv" / f"fold_{f['fold']}" / "metrics.json").read_text())
        test = plan.test_slides(f)
        ridge = get_method("ridge").fit(plan.train_slides(f), plan.genes, "toy", seed=1)
        ref = evaluate_fold({s.slide_id: ridge.predict(s) for s in test},
                            {s.slide_id: gene_counts(s, plan.genes) for s in test})
        assert rec["metrics"]["ridge"]["pooled"] == pytest.approx(ref["pooled"])
        assert rec["metrics"]["ridge"]["per_gene"]["pcc"] == pytest.approx(ref["per_gene"]["pcc"])
        assert res.folds[f["fold"]].metrics["ridge"]["pooled"] == pytest.approx(ref["pooled"])
