"""One content-addressed cache of method results: a fold is trained again only when something that made it changed.

Every fold a method is scored on in `hist_st.evaluate.run_cv` is stored as ``<run dir>/cache/<key>.json``,
``key`` the SHA-256 of everything that determines the result (`fold_key`; slides by content,
`slide_fingerprint`). Files an experiment needs back whole are recorded by `write_file_entry` and returned by
`cached_file`. What is keyed and why (content, not size + mtime), how entries are checked: docs/CONTRACTS.md.

```python
cache = ResultCache(["runs/other-run"])          # look-ups also search these folders (recursively)
entry = cache.get(key, run_dir)                   # None on a miss; a corrupted entry is ignored (warning)
```
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.jsonio import to_jsonable, write_json
from hist_st.methods.base import Method
from hist_st.model.config import RENAMED_KEYS
from hist_st.slide import Slide
from hist_st.train.config import TrainConfig, config_to_dict

__all__ = ["ResultCache", "digest", "fold_key", "method_signature", "slide_fingerprint", "CACHE_DIR", "cached_file",
           "file_digest", "write_file_entry"]

#: Version of the entry format; entries of another version are misses.
VERSION = 1
#: Folder of a run directory that holds its cache entries.
CACHE_DIR = "cache"
#: Config keys that change how a run is shown, not what it computes.
_COSMETIC = ("progress", "num_workers", "checkpoint_every")
#: Config keys whose settings give the same numbers bit for bit (tested), added after entries were written.
_SAME_RESULTS = ("optimizer_in_backward",)
#: Model keys renamed after entries were written -> the name the entries hold.
_FIRST_NAMES = {new: old for old, new in RENAMED_KEYS.items()}
#: Model keys added after entries were written -> the value every earlier entry was made with; a config
#: with that value is keyed without the key, so those entries still match.
_ADDED_MODEL_KEYS = {"head_init": "random"}
_METRIC_KEYS = {"pooled": ("r2", "pcc"), "per_gene": ("pcc", "r2")}


def digest(obj: Any) -> str:
    """SHA-256 (hex) of ``obj`` as canonical JSON (sorted keys, numpy values as plain numbers)."""
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()


def _config_signature(cfg: TrainConfig) -> dict[str, Any]:
    """A HiST config as it is keyed, less `_COSMETIC`, `_SAME_RESULTS` and genes, with renamed keys under
    their first name (`_FIRST_NAMES`) and added model keys left out at their earlier value
    (`_ADDED_MODEL_KEYS`): entries written before a key was added or renamed still match."""
    d = {key: val for key, val in config_to_dict(cfg).items() if key not in (*_COSMETIC, *_SAME_RESULTS, "genes")}
    model = {_FIRST_NAMES.get(k, k): v for k, v in (d.get("model") or {}).items()
             if k not in _ADDED_MODEL_KEYS or v != _ADDED_MODEL_KEYS[k]}  # digests sort keys
    return {**d, "model": model} if "model" in d else d


def method_signature(method: Method) -> dict[str, Any]:
    """The method's name and options as a comparable dict (a HiST config as `_config_signature` keys it)."""
    options = {k: _config_signature(v) if isinstance(v, TrainConfig) else v
               for k, v in method.options.items()}
    return to_jsonable({"name": method.name, "options": options})


def slide_fingerprint(slide: Slide, embedding: str) -> str:
    """SHA-256 of what a method reads from ``slide``: counts, coordinates, embedding ``embedding``, metadata."""
    h = hashlib.sha256()
    arrays: list[Any] = [slide.spatial, slide.barcodes.astype(str), np.asarray(slide.genes).astype(str),
                         slide.lattice, slide.array_coords, slide.embeddings.get(embedding)]
    if slide.counts is not None:
        arrays += [slide.counts.data, slide.counts.indices, slide.counts.indptr, np.array(slide.counts.shape)]
    for a in arrays:
        h.update(b"|" if a is None else np.ascontiguousarray(a).tobytes() + str(np.asarray(a).dtype).encode())
    scalars = [slide.slide_id, slide.um_per_px, slide.spot_pitch_um, slide.lattice_unit_um, slide.technology,
               slide.patient, slide.meta]
    h.update(json.dumps(to_jsonable(scalars), sort_keys=True).encode())
    return h.hexdigest()


def fold_key(
    method: Method, fold: Mapping[str, Any], genes: Sequence[str], *, embedding: str, seed: int,
    fingerprints: Mapping[str, str],
) -> dict[str, Any]:
    """The fields that determine one method's result on one fold (`digest` of it names the entry).

    Args:
        method: The unfitted method.
        fold: ``{"train": [...], "test": [...]}`` slide ids.
        genes: The fold's genes, in order.
        embedding: The embedding key the method reads.
        seed: The training seed.
        fingerprints: Slide id -> `slide_fingerprint`, for (at least) the fold's slides.
    """
    train, test = sorted(fold["train"]), sorted(fold["test"])
    return {"version": VERSION, "method": method_signature(method), "train": train, "test": test,
            "genes": list(genes), "embedding": embedding, "seed": int(seed),
            "slides": {s: fingerprints[s] for s in (*train, *test)}}


def _revive(metrics: Any) -> dict[str, Any]:
    """A stored `evaluate_fold` record with the scalar metrics back as floats (JSON stores NaN as null)."""
    out = dict(metrics)
    for proto, keys in _METRIC_KEYS.items():
        values = {k: float("nan" if out[proto][k] is None else out[proto][k]) for k in keys}
        out[proto] = {**out[proto], **values}
    return out


class ResultCache:
    """Cache entries of one run directory plus read-only look-ups in other folders.

    Args:
        extra: Folders searched (recursively, for ``cache/<key>.json``) after the run directory's own cache.
    """

    def __init__(self, extra: Iterable[str | Path] = ()) -> None:
        self.extra = [Path(p) for p in extra]

    @functools.cached_property
    def _index(self) -> dict[str, list[Path]]:
        """Entry name -> its files in the extra folders (searched once, on the first look-up)."""
        index: dict[str, list[Path]] = {}
        for p in (p for root in self.extra for p in sorted(root.glob(f"**/{CACHE_DIR}/*.json"))):
            index.setdefault(p.stem, []).append(p)
        return index

    def get(self, key: str, run_dir: str | Path) -> dict[str, Any] | None:
        """The valid entry named ``key`` (run directory first, then the extra folders), or None."""
        found = self.find(key, run_dir)
        return found[0] if found is not None else None

    def find(self, key: str, run_dir: str | Path) -> tuple[dict[str, Any], Path] | None:
        """`get`'s entry and the run folder whose ``cache/`` holds it (where its other files are), or None."""
        for path in [Path(run_dir) / CACHE_DIR / f"{key}.json", *self._index.get(key, [])]:
            if path.is_file():
                entry = read_entry(path, key)
                if entry is not None:
                    return entry, path.parent.parent
        return None


def read_entry(path: Path, key: str) -> dict[str, Any] | None:
    """The entry at ``path`` when it is whole and its fields hash to ``key``; else None with a warning."""
    try:
        entry = json.loads(path.read_text())
        if digest(entry["key"]) != key:
            raise ValueError("its key fields do not hash to its name")
        if "metrics" in entry:  # a scored fold (run_cv); a trained model's entry names its file instead
            entry["metrics"] = _revive(entry["metrics"])
        entry["seconds"] = float(entry["seconds"])
        return entry
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"ignoring the cache entry {path}: {exc}", UserWarning, stacklevel=3)
        return None


def write_entry(run_dir: str | Path, key_fields: Mapping[str, Any], entry: Mapping[str, Any]) -> Path:
    """Store ``entry`` (``metrics``, ``seconds``, ``history``, ``origin``) under the digest of ``key_fields``."""
    path = Path(run_dir) / CACHE_DIR / f"{digest(key_fields)}.json"
    return write_json({**entry, "key": key_fields}, path)


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached_file(cache: ResultCache | None, key_fields: Mapping[str, Any], folder: str | Path) -> Path | None:
    """The file ``folder/<name>`` that ``cache`` holds an entry for ``key_fields`` about (in ``folder/cache``),
    when the file is still the one the entry recorded (content hash); None otherwise, or when ``cache`` is None."""
    entry = cache.get(digest(key_fields), folder) if cache is not None else None
    path = Path(folder) / str((entry or {}).get("file", ""))
    return path if entry is not None and path.is_file() and file_digest(path) == entry.get("sha256") else None


def write_file_entry(folder: str | Path, key_fields: Mapping[str, Any], name: str, seconds: float) -> Path:
    """Record that ``folder/<name>`` (a finished checkpoint, a derived slide) is the result of ``key_fields``."""
    return write_entry(folder, key_fields, {"file": name, "sha256": file_digest(Path(folder) / name),
                                            "seconds": seconds, "origin": str(folder)})
