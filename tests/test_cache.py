"""`hist_st.evaluate.cache`: run_cv reuses a (method, fold) only when every key field is the same."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from hist_st.evaluate import make_plan, run_cv
from hist_st.evaluate.cache import CACHE_DIR, ResultCache
from hist_st.methods import get_method
from hist_st.train.config import GeneConfig
from hist_st.train.toy import write_toy_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_toy_cohort(tmp_path_factory.mktemp("toy"), n_slides=4, n_spots=50, n_genes=10, dim=8)


def _counting(name, **options):
    """A method whose fits are counted in ``method.fits``."""
    m = get_method(name, **options)
    m.fits = 0
    inner = m._fit

    def fit(*a, **kw):
        m.fits += 1
        return inner(*a, **kw)

    m._fit = fit
    return m


def _run(plan, out, *, seed=1, cache=None, **options):
    """Fits, summaries and reused folders of a run_cv of a counting ridge."""
    m = _counting("ridge", **options)
    res = run_cv(plan, [m], out, seed=seed, progress=False, cache=cache)
    return m.fits, {"methods": res.summaries(), "reused": {k: v.reused_from for k, v in res.methods.items()
                                                           if v.reused_from}}


def test_identical_settings_hit_and_changed_keys_miss(cohort, tmp_path):
    plan = make_plan(cohort, GeneConfig.from_spec("hvg:5"), k=2, seed=1)
    out = tmp_path / "cv"
    fits, first = _run(plan, out, n_components=4)
    assert fits == 2 and len(list((out / CACHE_DIR).glob("*.json"))) == 2
    fits, again = _run(plan, out, n_components=4, cache=ResultCache())
    assert fits == 0 and again["methods"] == first["methods"] and again["reused"] == {}
    fold = json.loads((out / "fold_0" / "metrics.json").read_text())
    fits, _ = _run(plan, out, n_components=4)  # no cache: trained again, identical files
    assert fits == 2 and json.loads((out / "fold_0" / "metrics.json").read_text()) == fold

    # every key field changed alone is a miss (looked up in the first run's folder)
    other_genes = make_plan(cohort, GeneConfig.from_spec("hvg:4"), k=2, seed=1)
    other_folds = make_plan(cohort, GeneConfig.from_spec("hvg:5"), k=2, seed=2)
    sid = sorted(plan.slides)[0]
    changed = dataclasses.replace(plan.slides[sid], counts=plan.slides[sid].counts * 2)
    other_cohort = dataclasses.replace(plan, slides={**plan.slides, sid: changed})
    assert other_folds.folds != plan.folds
    cache = ResultCache([out])
    for i, (p, seed, opts) in enumerate([(plan, 2, {"n_components": 4}), (plan, 1, {"n_components": 3}),
                                         (other_genes, 1, {"n_components": 4}),
                                         (other_folds, 1, {"n_components": 4}),
                                         (other_cohort, 1, {"n_components": 4})]):
        fits, res = _run(p, tmp_path / f"miss{i}", seed=seed, cache=cache, **opts)
        assert fits == 2 and res["reused"] == {}, i
    # the same settings in another folder: taken from the first run, which is named
    fits, res = _run(plan, tmp_path / "copy", cache=ResultCache([tmp_path / "miss0", out]))
    assert fits == 2  # default options differ from n_components=4
    fits, res = _run(plan, tmp_path / "copy", n_components=4, cache=ResultCache([out]))
    assert fits == 0 and res["reused"] == {"ridge": str(out)} and res["methods"] == first["methods"]


def test_a_copied_cohort_hits(cohort, tmp_path):
    """The cohort fingerprint is the slides' content, not their path or mtime: a copy elsewhere hits."""
    plan = make_plan(cohort, GeneConfig.from_spec("hvg:5"), k=2, seed=1)
    _, first = _run(plan, tmp_path / "cv")
    copy = shutil.copytree(cohort, tmp_path / "elsewhere")
    fits, res = _run(make_plan(copy, GeneConfig.from_spec("hvg:5"), k=2, seed=1), tmp_path / "cv2",
                     cache=ResultCache([tmp_path / "cv"]))
    assert fits == 0 and res["methods"] == first["methods"] and res["reused"] == {"ridge": str(tmp_path / "cv")}


def test_corrupted_or_partial_entries_are_ignored_with_a_warning(cohort, tmp_path):
    plan = make_plan(cohort, GeneConfig.from_spec("hvg:5"), k=2, seed=1)
    out = tmp_path / "cv"
    _, first = _run(plan, out)
    entries = sorted((out / CACHE_DIR).glob("*.json"))
    entries[0].write_text(entries[0].read_text()[:40])  # cut short
    rec = json.loads(entries[1].read_text())
    rec["key"]["seed"] = 7  # fields that no longer hash to the name
    entries[1].write_text(json.dumps(rec))
    with pytest.warns(UserWarning, match="ignoring the cache entry"):
        fits, res = _run(plan, out, cache=ResultCache())
    assert fits == 2 and res["methods"] == first["methods"]
    fits, _ = _run(plan, out, cache=ResultCache())  # rewritten whole
    assert fits == 0
    assert not list((out / CACHE_DIR).glob(".*"))  # no temporary files left


def test_hist_keys_survive_added_and_renamed_config_keys():
    """Entries written before `optimizer_in_backward` and `model.head_init` existed and before `model.window`
    became `model.half_window` still match: the key is the one the code before that change computed (digest
    taken from commit 5baf05b for this config, whose head was random). The zero head (the default now) is
    another key."""
    from hist_st.evaluate.cache import digest, method_signature
    from hist_st.methods import HiSTMethod
    from hist_st.train.config import load_config

    assert digest(method_signature(HiSTMethod(load_config(None, ["epochs=7"])))) != (
        "bb31e26e505be86f332b1c081595b1c133cd36223167e16970deffbbbd2d4c7b")
    sig = method_signature(HiSTMethod(load_config(None, ["epochs=7", "model.head_init=random"])))
    assert "head_init" not in sig["options"]["config"]["model"]
    assert "window" in sig["options"]["config"]["model"] and "half_window" not in sig["options"]["config"]["model"]
    assert digest(sig) == "bb31e26e505be86f332b1c081595b1c133cd36223167e16970deffbbbd2d4c7b"
    same = method_signature(HiSTMethod(load_config(None, ["epochs=7", "optimizer_in_backward=true",
                                                          "model.head_init=random"])))
    assert digest(same) == digest(sig)
    assert digest(method_signature(HiSTMethod(load_config(None, ["epochs=7", "model.half_window=2",
                                                                 "model.head_init=random"])))) != digest(sig)


def test_entries_from_before_the_maps_protocol_gain_it_from_their_prediction_files(cohort, tmp_path):
    """A cached HiST fold written before map PCC existed is scored from the run's prediction files, to the
    value training recorded to float32 rounding (1.5e-5 on this 2-epoch toy model), and stored with it; a
    method without prediction files keeps no map PCC."""
    from hist_st.methods import HiSTMethod
    from hist_st.train.config import load_config

    plan = make_plan(cohort, GeneConfig.from_spec("hvg:6"), k=2, seed=1)
    cfg = load_config(None, ["model.dim=16", "model.heads=2", "model.levels=11-1", "epochs=2", "progress=false"])
    out = tmp_path / "cv"
    first = run_cv(plan, [HiSTMethod(cfg), get_method("mean")], out, seed=1, progress=False)
    for entry in (out / CACHE_DIR).glob("*.json"):  # as written before the maps protocol
        rec = json.loads(entry.read_text())
        rec["metrics"].pop("maps")
        for v in rec["metrics"]["per_slide"].values():
            v.pop("map_pcc")
        entry.write_text(json.dumps(rec))
    again = run_cv(plan, [HiSTMethod(cfg), get_method("mean")], tmp_path / "again", seed=1, progress=False,
                   cache=ResultCache([out]))
    assert again.methods["HiST"].reused_from == str(out)
    for a, b in zip(first.folds, again.folds):
        assert b.metrics["HiST"]["maps"]["pcc"] == pytest.approx(a.metrics["HiST"]["maps"]["pcc"], abs=1e-4)
        assert {s: v["map_pcc"] for s, v in b.metrics["HiST"]["per_slide"].items()} == pytest.approx(
            {s: v["map_pcc"] for s, v in a.metrics["HiST"]["per_slide"].items()}, abs=1e-4)
        assert "maps" not in b.metrics["mean"]
    summary = again.summaries()
    assert summary["HiST"]["maps"]["pcc"]["mean"] == pytest.approx(first.summaries()["HiST"]["maps"]["pcc"]["mean"],
                                                                   abs=1e-4)
    assert "maps" not in summary["mean"]
    stored = [json.loads(p.read_text()) for p in (tmp_path / "again" / CACHE_DIR).glob("*.json")]
    assert sorted(("maps" in r["metrics"], r["method"]) for r in stored) == [(False, "mean")] * 2 + [(True, "HiST")] * 2
