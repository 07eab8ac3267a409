"""What ``train --resume`` may change: compare a run's request with the checkpoint it continues.

A resumed run must be the run that was interrupted: the same training slides, genes and configuration.
`resume_differences` lists every difference; `check_resume` refuses them (naming each) unless the
caller accepts them explicitly, and only those a resumed run can honour can be accepted at all
(`ACCEPTABLE`): a different slide list and keys that do not shape the model, the optimiser state or the
learning-rate schedule. Keys that change only where and how fast a run computes (`RUNTIME_KEYS`) are
never compared.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hist_st.errors import InputError
from hist_st.slide import atomic_write

__all__ = ["RUNTIME_KEYS", "ACCEPTABLE", "ACCEPTED_LOG", "data_fingerprint", "changed_data", "flatten", "resume_differences", "check_resume", "record_accepted"]

#: Keys that never change what a run computes (where and how fast it runs, how often it saves, when the
#: optimiser steps: `optimizer_in_backward` gives the same parameters bit for bit).
RUNTIME_KEYS = ("device", "progress", "num_workers", "threads", "checkpoint_every", "optimizer_in_backward")
#: Keys filled from the data when a run starts (the request's placeholders are not compared).
DATA_FILLED = ("model.in_dim", "model.n_genes")
#: Differences ``--accept-changes`` may accept: key prefixes a resumed run can honour from the next epoch.
ACCEPTABLE = ("slides", "slide data", "augment.", "seed", "amp", "amp_cpu", "grad_checkpointing")
ACCEPTED_LOG = "accepted_changes.json"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dim": 32}}`` -> ``{"model.dim": 32}`` (lists and tuples compared as lists)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def data_fingerprint(xy: Any, features: Any, target: Any) -> str:
    """SHA-256 of what a slide contributes to training: coordinates ``[N, 2]``, features ``[N, C]`` and
    log1p targets ``[N, G]`` (numpy arrays or tensors; ``target`` may be None)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for arr in (xy, features, target):
        if arr is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(arr.detach().cpu().numpy() if hasattr(arr, "detach") else np.asarray(arr))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def changed_data(saved: Mapping[str, str] | None, now: Mapping[str, str]) -> dict[str, str]:
    """``{"slide data": ...}`` naming the slides whose training data differ from the checkpoint's record
    (re-prepared with other embeddings, counts or coordinates); empty when none (or nothing recorded)."""
    if not saved:
        return {}
    changed = sorted(k for k, v in now.items() if k in saved and saved[k] != v)
    if not changed:
        return {}
    return {"slide data": f"changed since the checkpoint for {_short(changed)} (re-prepared?)"}


def _short(ids: Sequence[str]) -> str:
    ids = list(ids)
    return "[" + ", ".join(ids[:8]) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "") + "]"


def resume_differences(
    saved_config: Mapping[str, Any],
    config: Mapping[str, Any],
    saved_slides: Sequence[str] | None,
    slides: Sequence[str],
    saved_genes: Sequence[str],
    genes: Sequence[str] | None,
) -> dict[str, str]:
    """Differences between a checkpoint and a resume request, keyed by what differs.

    Args:
        saved_config: The checkpoint's resolved config (`config_to_dict`).
        config: The request's config as a dict.
        saved_slides: Training slide ids recorded in the checkpoint (None for checkpoints without them).
        slides: The request's training slide ids.
        saved_genes: The checkpoint's genes.
        genes: Genes the caller asked for (None: take the checkpoint's).

    Returns:
        ``{key: "checkpoint X, now Y"}``; empty when the request matches. ``key`` is ``"slides"``,
        ``"genes"`` or a dotted config key.
    """
    diffs: dict[str, str] = {}
    if saved_slides is not None and sorted(map(str, saved_slides)) != sorted(map(str, slides)):
        old, new = set(map(str, saved_slides)), set(map(str, slides))
        parts = []
        if new - old:
            parts.append(f"added {_short(sorted(new - old))}")
        if old - new:
            parts.append(f"removed {_short(sorted(old - new))}")
        diffs["slides"] = f"checkpoint {_short(sorted(old))}, now {_short(sorted(new))} ({'; '.join(parts)})"
    if genes is not None and list(map(str, genes)) != list(map(str, saved_genes)):
        diffs["genes"] = f"checkpoint {len(saved_genes)} genes, now {len(genes)} (a different gene list)"
    old_cfg, new_cfg = flatten(saved_config), flatten(config)
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key in RUNTIME_KEYS or key in DATA_FILLED:
            continue
        if key == "embedding" and new_cfg.get(key) is None:
            continue  # None = "the only one present": the checkpoint's resolved key
        if old_cfg.get(key) != new_cfg.get(key):
            diffs[key] = f"checkpoint {old_cfg.get(key)!r}, now {new_cfg.get(key)!r}"
    return diffs


def _acceptable(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in ACCEPTABLE)


def check_resume(diffs: Mapping[str, str], source: str | Path, accept: bool) -> dict[str, str]:
    """Refuse ``diffs`` unless ``accept`` and every one is acceptable; return the accepted ones.

    Raises:
        InputError: Naming the checkpoint and listing every difference.
    """
    if not diffs:
        return {}
    lines = "; ".join(f"{k}: {v}" for k, v in diffs.items())
    fixed = [k for k in diffs if not _acceptable(k)]
    if fixed:
        raise InputError(
            source,
            f"this run differs from the checkpoint it resumes - {lines}. "
            f"{', '.join(fixed)} cannot change in a resumed run (they shape the model, its genes, the "
            "optimiser state or the learning-rate schedule): resume with the checkpoint's values, or start "
            "a new run in another --out folder",
        )
    if not accept:
        raise InputError(
            source,
            f"this run differs from the checkpoint it resumes - {lines}. Resume with the same slides and "
            "settings, or pass --accept-changes to continue with these changes (recorded in the run folder)",
        )
    return dict(diffs)


def record_accepted(out_dir: str | Path, diffs: Mapping[str, str], epoch: int) -> Path:
    """Append the accepted differences to ``<out_dir>/accepted_changes.json`` (a list of records)."""

    path = Path(out_dir) / ACCEPTED_LOG
    records: list[Any] = []
    if path.is_file():
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError:
            records = []
        if not isinstance(records, list):
            records = []
    records.append({"resumed_after_epoch": int(epoch), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "changes": dict(diffs)})
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(records, indent=1))
    return path
