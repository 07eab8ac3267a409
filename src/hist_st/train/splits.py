"""Validation of cross-validation splits (a ``splits.json`` file or a list of folds) before any training.

A splits file is ``{"folds": [{"fold": 0, "train": [...], "test": [...]}, ...], ...}`` (as written by
`hist_st.train.folds.save_folds`) or a bare JSON list of such folds. Every problem is reported with the
file, the fold and what is wrong, before the first fold trains:

```python
from hist_st.train.splits import read_splits
folds = read_splits("runs/cv/splits.json", slide_ids=["A1", "A2", "B1", "B2"])
```
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hist_st.errors import InputError
from hist_st.io.hest import read_hest_bench_splits

__all__ = ["read_splits", "check_folds"]


def read_splits(path: str | Path, slide_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Read and validate a splits file (`check_folds`).

    Args:
        path: JSON file: ``{"folds": [...]}`` or a list of folds; or a folder of HEST-Benchmark's fixed
            splits (``train_<i>.csv`` / ``test_<i>.csv``, `hist_st.io.hest.read_hest_bench_splits`).
        slide_ids: The slides available; every id a fold names must be among them (None: not checked).

    Returns:
        ``[{"fold": int, "train": [ids], "test": [ids]}, ...]`` (ids as given, other keys kept).

    Raises:
        InputError: Naming the file, the fold and the problem.
    """
    p = Path(path)
    if p.is_dir():
        return check_folds(read_hest_bench_splits(p), slide_ids, p)
    if not p.is_file():
        raise InputError(p, "splits file not found")
    try:
        data = json.loads(p.read_text())
    except UnicodeDecodeError:
        raise InputError(p, "not a text (JSON) file") from None
    except json.JSONDecodeError as exc:
        raise InputError(p, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(data, Mapping):
        if "folds" not in data:
            raise InputError(p, "has no 'folds' list (expected {\"folds\": [{\"train\": [...], \"test\": [...]}]})")
        data = data["folds"]
    return check_folds(data, slide_ids, p)


def _id_list(value: Any, where: str, source: str | Path) -> list[str]:
    if isinstance(value, str):
        raise InputError(
            source, f"{where} must be a list of slide ids, got the string {value!r} (write [{json.dumps(value)}])"
        )
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InputError(source, f"{where} must be a list of non-empty slide-id strings, got {value!r:.80}")
    if not value:
        raise InputError(source, f"{where} is empty")
    dup = sorted({v for v in value if value.count(v) > 1})
    if dup:
        raise InputError(source, f"{where} lists slide(s) more than once: {', '.join(dup[:5])}")
    return list(value)


def check_folds(
    folds: Any, slide_ids: Sequence[str] | None = None, source: str | Path = "folds"
) -> list[dict[str, Any]]:
    """Validate folds: a non-empty list of ``{"train": [...], "test": [...]}`` with disjoint, non-empty
    lists of known, unique slide ids and unique fold numbers.

    Args:
        folds: The folds (parsed JSON or Python objects).
        slide_ids: Known slide ids (None: not checked).
        source: Named in errors (the splits file).

    Returns:
        The folds as dicts, each with an integer ``fold`` (its position when absent).

    Raises:
        InputError: Naming ``source``, the fold and the problem.
    """
    if not isinstance(folds, list):
        raise InputError(source, f"the folds must be a list, got {type(folds).__name__}")
    if not folds:
        raise InputError(source, "holds no folds")
    known = set(map(str, slide_ids)) if slide_ids is not None else None
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for i, f in enumerate(folds):
        if not isinstance(f, Mapping):
            raise InputError(source, f"fold {i} must be a mapping with 'train' and 'test' lists, got {f!r:.80}")
        n = f.get("fold", i)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(source, f"fold {i}: 'fold' must be a non-negative integer, got {n!r}")
        if n in seen:
            raise InputError(source, f"fold number {n} appears twice")
        seen.add(n)
        for key in ("train", "test"):
            if key not in f:
                raise InputError(source, f"fold {n} has no {key!r} list")
        train = _id_list(f["train"], f"fold {n} 'train'", source)
        test = _id_list(f["test"], f"fold {n} 'test'", source)
        both = sorted(set(train) & set(test))
        if both:
            raise InputError(source, f"fold {n} has slide(s) in both train and test: {', '.join(both[:5])}")
        if known is not None:
            unknown = sorted((set(train) | set(test)) - known)
            if unknown:
                raise InputError(source, f"fold {n} names slide(s) that are not in the cohort: {', '.join(unknown[:5])}")
        out.append({**dict(f), "fold": n, "train": train, "test": test})
    return out
