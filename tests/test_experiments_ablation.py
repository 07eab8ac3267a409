"""The Table 3 ablation registry yields distinct, valid configs that each change one factor."""

from __future__ import annotations

import pytest

from hist_st.errors import InputError
from hist_st.experiments.ablation import ABLATIONS, PAPER_TABLE3, ablation_config, format_ablation_table
from hist_st.train.config import config_to_dict, load_config


def test_registry_covers_table3():
    assert set(ABLATIONS) == set(PAPER_TABLE3)
    for name in ("aug-none", "aug-mirror", "aug-shear", "aug-rotate", "aug-drop", "pos-none", "pos-rope",
                 "pos-alibi", "skip-none", "skip-additive", "no-resample", "no-shift", "no-token"):
        assert name in ABLATIONS


def test_configs_distinct_and_valid():
    base = load_config(None, ["model.dim=32", "model.heads=4"])
    seen = {}
    for name in ABLATIONS:
        cfg = ablation_config(base, name)
        key = repr(config_to_dict(cfg))
        assert key not in seen, f"{name} equals {seen.get(key)}"
        seen[key] = name
        # still a valid, rebuildable model config
        type(cfg.model).from_dict(cfg.model.to_dict())
    assert ablation_config(base, "full") == base


def test_single_factor_changes():
    base = load_config(None, ["model.dim=32", "model.heads=4"])
    assert ablation_config(base, "no-token").model.tokens == ()
    assert ablation_config(base, "pos-rope").model.positional == "rope"
    assert ablation_config(base, "skip-additive").model.skip == "additive"
    assert ablation_config(base, "no-resample").model.resample is False
    assert ablation_config(base, "no-shift").model.shifted is False
    assert ablation_config(base, "aug-none").augment.enabled is False
    m = ablation_config(base, "aug-mirror").augment
    assert (m.mirror, m.shear, m.rotate, m.dropout) == (True, False, False, 0.0)
    d = ablation_config(base, "aug-drop").augment.resolved()
    assert (d.mirror, d.shear, d.rotate) == (False, False, False) and d.dropout > 0
    assert ablation_config(base, "no-token").model.positional == base.model.positional


def test_unknown_and_table():
    with pytest.raises(InputError):
        ablation_config(load_config(None, []), "nope")
    stat = {"mean": 0.5, "std": 0.1, "values": [0.4, 0.6]}
    s = {"pooled": {"r2": stat, "pcc": stat}, "per_gene": {"pcc": stat, "r2": stat}}
    low = {"mean": 0.3, "std": 0.1, "values": [0.2, 0.4]}
    s2 = {"pooled": {"r2": low, "pcc": stat}, "per_gene": {"pcc": low, "r2": stat}}
    table = format_ablation_table({"full": s, "no-token": s2})
    assert "-0.200" in table and "| yes |" in table
