"""Cross-validation folds: deterministic, disjoint, covering, grouped by patient."""

from __future__ import annotations

import pytest

from hist_st.errors import InputError
from hist_st.train.folds import load_folds, make_folds, save_folds

IDS = [f"s{i:02d}" for i in range(11)]


def test_folds_deterministic_disjoint_covering():
    a = make_folds(IDS, 4, seed=0)
    b = make_folds(list(reversed(IDS)), 4, seed=0)  # input order does not matter
    assert a == b
    tests = [set(f["test"]) for f in a]
    assert set().union(*tests) == set(IDS)
    assert sum(len(t) for t in tests) == len(IDS)
    for f in a:
        assert not set(f["train"]) & set(f["test"])
        assert set(f["train"]) | set(f["test"]) == set(IDS)
    assert sorted(len(t) for t in tests) == [2, 3, 3, 3]
    assert make_folds(IDS, 4, seed=1) != a


def test_folds_grouped_by_patient():
    groups = {s: f"P{i // 3}" for i, s in enumerate(IDS)}  # 4 patients of 3, 3, 3, 2 slides
    folds = make_folds(IDS, 4, seed=0, groups=groups)
    for f in folds:
        test_patients = {groups[s] for s in f["test"]}
        train_patients = {groups[s] for s in f["train"]}
        assert not test_patients & train_patients
    assert make_folds(IDS, 4, seed=0, groups=groups) == folds
    assert set().union(*[set(f["test"]) for f in folds]) == set(IDS)


def test_folds_errors(tmp_path):
    with pytest.raises(InputError, match="at least 4 slides"):
        make_folds(IDS[:3], 4)
    with pytest.raises(InputError, match="duplicate"):
        make_folds(["a", "a", "b"], 2)
    with pytest.raises(InputError, match="groups"):
        make_folds(IDS, 4, groups={s: "P0" for s in IDS})
    with pytest.raises(InputError, match="without a group"):
        make_folds(IDS, 2, groups={})


def test_folds_roundtrip(tmp_path):
    folds = make_folds(IDS, 3, seed=2)
    path = save_folds(folds, tmp_path / "splits.json", k=3, seed=2)
    assert load_folds(path) == folds
