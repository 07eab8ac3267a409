"""Cross-validation folds by slide or by group (patient), deterministic and saved with the run.

The authors' folds depended on the directory listing order; here they depend only on the sorted slide
ids (or group names) and a seed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.errors import InputError
from hist_st.slide import atomic_write
from hist_st.train.splits import read_splits

__all__ = ["make_folds", "save_folds", "load_folds"]


def make_folds(
    slide_ids: Sequence[str], k: int = 4, seed: int = 0, groups: Mapping[str, str] | None = None
) -> list[dict[str, list[str]]]:
    """Split slides into ``k`` folds.

    By slide (``groups`` None): the sorted ids are shuffled with ``seed`` and dealt into ``k`` folds of
    near-equal size (the paper's 4-fold CV). By group: the sorted group names are shuffled with ``seed``
    and each group, largest first, goes whole to the fold with the fewest slides so far (ties: lowest
    fold index); no group is split across folds. A slide whose group is unknown (None or "", e.g. a
    HEST sample with a blank patient) is a group of its own, and the folds say so.

    Args:
        slide_ids: Slide ids (any order; duplicates are an error).
        k: Number of folds (2 <= k <= number of slides or groups).
        seed: Shuffle seed.
        groups: Slide id -> group (e.g. patient, or None when unknown); every slide needs an entry.

    Returns:
        ``k`` dicts ``{"fold": i, "train": [...], "test": [...]}``, ids sorted; test sets are disjoint
        and cover every slide. With groups, a fold whose test slides include slides of unknown group
        also has ``"unknown_group": [...]`` (those slides, each its own group).

    Raises:
        InputError: Too few slides/groups for ``k``, duplicate ids, slides without a group.
    """
    ids = sorted(map(str, slide_ids))
    if len(set(ids)) != len(ids):
        raise InputError("folds", "duplicate slide ids")
    if k < 2:
        raise InputError("folds", f"need at least 2 folds, got {k}")
    rng = np.random.default_rng([int(seed), 0xF01D])
    if groups is None:
        if len(ids) < k:
            raise InputError("folds", f"{k}-fold CV needs at least {k} slides, got {len(ids)}")
        order = [ids[i] for i in rng.permutation(len(ids))]
        tests = [sorted(order[i::k]) for i in range(k)]
    else:
        missing = [s for s in ids if s not in groups]
        if missing:
            raise InputError("folds", f"slide(s) without a group: {missing[:5]}")
        unknown = {s for s in ids if groups[s] is None or str(groups[s]).strip() in ("", "nan")}
        members: dict[str, list[str]] = {}
        for s in ids:
            # "\0" cannot occur in a group name, so an unknown-group slide never joins a named group
            members.setdefault(f"\0{s}" if s in unknown else str(groups[s]), []).append(s)
        names = sorted(members)
        if len(names) < k:
            raise InputError("folds", f"{k}-fold CV by group needs at least {k} groups, got {len(names)}")
        shuffled = [names[i] for i in rng.permutation(len(names))]
        shuffled.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the shuffled order
        tests = [[] for _ in range(k)]
        for g in shuffled:
            j = min(range(k), key=lambda i: (len(tests[i]), i))
            tests[j].extend(members[g])
        tests = [sorted(t) for t in tests]
        if unknown:
            return [
                {"fold": i, "train": sorted(s for s in ids if s not in set(t)), "test": t}
                | ({"unknown_group": [s for s in t if s in unknown]} if any(s in unknown for s in t) else {})
                for i, t in enumerate(tests)
            ]
    return [
        {"fold": i, "train": sorted(s for s in ids if s not in set(t)), "test": t} for i, t in enumerate(tests)
    ]


def save_folds(folds: Sequence[Mapping[str, Any]], path: str | Path, **meta: Any) -> Path:
    """Write the folds (and how they were made: ``k``, ``seed``, ``group_by``...) as JSON."""

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({**meta, "folds": list(folds)}, indent=2))
    return Path(path)


def load_folds(path: str | Path) -> list[dict[str, list[str]]]:
    """Read folds written by `save_folds` (or a bare JSON list of ``{"train", "test"}``), validated by
    `hist_st.train.splits.read_splits` (clear errors for malformed JSON, empty or overlapping lists...), or
    HEST-Benchmark's fixed patient-level splits from a folder (`hist_st.io.hest.read_hest_bench_splits`)."""

    return read_splits(path)
