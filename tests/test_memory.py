"""The allocator policy of train/predict: glibc's default unless HIST_ST_MALLOC=fixed asks otherwise."""

import pytest

from hist_st.memory import MALLOC_ENV, malloc_policy


def test_default_policy_leaves_glibc_alone(monkeypatch):
    monkeypatch.delenv(MALLOC_ENV, raising=False)
    assert malloc_policy() == "default"


def test_fixed_policy_is_applied(monkeypatch):
    monkeypatch.setenv(MALLOC_ENV, "Fixed")
    assert malloc_policy() == "fixed"


def test_unknown_policy_names_the_variable(monkeypatch):
    monkeypatch.setenv(MALLOC_ENV, "tiny")
    with pytest.raises(ValueError, match="HIST_ST_MALLOC='tiny'"):
        malloc_policy()
