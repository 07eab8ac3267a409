"""JSON records of runs: numpy-aware conversion and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.errors import InputError
from hist_st.slide import atomic_write

__all__ = ["to_jsonable", "write_json", "read_json"]


def to_jsonable(obj: Any) -> Any:
    """Plain-Python copy of ``obj``: numpy scalars/arrays to numbers/lists, NaN/inf to None, keys to str."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.floating | float):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, str | int | bool) or obj is None:
        return obj
    return str(obj)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically (temporary name, then rename); returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(obj), indent=1))
    return Path(path)


def read_json(path: str | Path) -> Any:
    """Read a JSON file; `InputError` naming it when missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(p, f"invalid JSON ({exc})") from exc
