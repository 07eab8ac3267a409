"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _her2st_dir() -> Path:
    env = os.environ.get("HIST_ST_HER2ST")
    return Path(env) if env else REPO.parent / "shared" / "data" / "her2st"


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The real her2st data set (``../shared/data/her2st`` or ``$HIST_ST_HER2ST``); skips when absent."""
    path = _her2st_dir()
    if not (path / "ST-cnts").is_dir():
        pytest.skip(f"real her2st data not found at {path} (set HIST_ST_HER2ST to its folder)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    """Tests run two pytest workers on two cores: one torch thread each keeps them from oversubscribing."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    yield
