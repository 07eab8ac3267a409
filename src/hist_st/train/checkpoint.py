"""Self-describing, restorable checkpoints and the `ModelBundle` used for prediction.

A checkpoint holds only tensors, primitives, lists and dicts, so ``torch.load(path, weights_only=True)``
reads it. Contents (``format = "hist-st-checkpoint"``, ``version = 1``):

- ``model``: the model's state dict; ``model_config``: its `HiSTConfig` as a dict (the architecture is
  rebuilt from it; no import paths);
- ``optimizer``, ``scheduler``: their state dicts; ``epoch``: epochs completed; ``step``: optimiser steps;
- ``rng``: Python, NumPy, torch (and CUDA) generator states at the end of that epoch;
- ``config``: the resolved `TrainConfig` as a dict; ``genes``: predicted genes in output order;
  ``embedding``: the embedding key the model reads;
- ``lattice``: ``{"unit_um": {technology: um}, "spot_pitch_um": {technology: um}, "technologies": [...],
  "lattice_type": {technology: "hex" | "square"}}`` (``lattice_type`` is filled from the technologies by
  `save_checkpoint` when the payload lacks it);
- ``inputs`` (optional, `training_inputs`): how the training embeddings were made: ``encoder`` (registry
  name), ``encoder_weights``, ``patch`` (``{"size_px", "um_per_px"}``), ``stain_norm``; needed to embed a new
  H&E image the same way (`hist_st.predict_image`);
- ``norm``: ``{"target_mean": [G] tensor, "feature_mean"/"feature_std": [C] tensors or None,
  "standardise_features": bool}``;
- ``history``: per-epoch records (loss, lr, strength, ...); ``versions``: package versions;
- ``kind``: ``"model"`` (the final model file, ``model.pt``: everything above except ``optimizer``,
  ``scheduler`` and ``rng``) or ``"resume"`` (``resume.pt``: everything, for ``train --resume``); older
  checkpoints without ``kind`` hold both and serve both purposes;
- ``sha256``: content hash of every other field (`content_hash`), checked by `load_checkpoint`, so a
  flipped bit in the weights is refused instead of producing ``inf`` predictions.

Files are written atomically (temporary name in the same folder, then rename). Weights are checked
finite before anything is written and again when a file is read.
"""

from __future__ import annotations

import copy
import hashlib
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hist_st.errors import InputError
from hist_st.model import HiST
from hist_st.model.config import HiSTConfig
from hist_st.slide import atomic_write

__all__ = [
    "FORMAT",
    "MODEL_FILE",
    "finished_epochs",
    "resume_source",
    "RESUME_FILE",
    "RESUME_ONLY_KEYS",
    "ModelBundle",
    "BackgroundWriter",
    "content_hash",
    "model_payload",
    "load_resume_state",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "load_bundle",
    "lattice_type_for",
    "training_inputs",
]

FORMAT = "hist-st-checkpoint"
VERSION = 1
MODEL_FILE = "model.pt"
RESUME_FILE = "resume.pt"
#: Fields only the resume state needs (the AdamW moments are about 2/3 of a full checkpoint).
RESUME_ONLY_KEYS = ("optimizer", "scheduler", "rng")
#: Fields every checkpoint needs to rebuild and run the model.
MODEL_KEYS = ("model", "model_config", "genes", "embedding")
#: Fields `train --resume` needs on top of `MODEL_KEYS`.
RESUME_KEYS = (*MODEL_KEYS, *RESUME_ONLY_KEYS, "epoch", "step", "config", "norm")

#: Spot lattice type per technology: Visium spots sit on a hexagonal grid, legacy ST spots and
#: Visium HD bins on a square one.
LATTICE_TYPE = {"visium": "hex", "synthetic-hex": "hex", "st": "square", "visium-hd": "square"}


def lattice_type_for(technology: str) -> str | None:
    """``"hex"`` or ``"square"`` for a technology name, None when unknown."""
    t = str(technology).lower()
    if t in LATTICE_TYPE:
        return LATTICE_TYPE[t]
    if "hex" in t:
        return "hex"
    if "square" in t:
        return "square"
    return None


def training_inputs(slides: Sequence[Any]) -> dict[str, Any]:
    """How the embeddings of training ``slides`` were made (read from their ``meta``), for the checkpoint.

    Args:
        slides: Prepared `Slide` records (``meta`` holds ``encoder``, ``encoder_weights``, ``patch``,
            ``stain_norm`` as written by `hist_st.prepare`).

    Returns:
        ``{"encoder", "encoder_weights", "patch", "stain_norm"}``: the value shared by all slides, or None
        where slides disagree or do not record it.
    """

    def shared(key: str) -> Any:
        vals = [s.meta.get(key) for s in slides]
        first = vals[0] if vals else None
        return first if all(v == first for v in vals) else None

    patch = shared("patch")
    return {
        "encoder": shared("encoder"),
        "encoder_weights": shared("encoder_weights"),
        "patch": dict(patch) if isinstance(patch, dict) else None,
        "stain_norm": shared("stain_norm"),
    }


def rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and CUDA generator states as weights_only-safe values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by `rng_state`."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _hash_update(h: Any, value: Any) -> None:
    """Feed a canonical byte form of ``value`` (nested dicts/lists of tensors and primitives) to ``h``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=str):
            h.update(f"K{k!r}".encode())
            _hash_update(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _hash_update(h, v)
    elif isinstance(value, np.ndarray):
        _hash_update(h, torch.from_numpy(np.ascontiguousarray(value)))
    else:
        h.update(f"V{type(value).__name__}:{value!r}".encode())


def content_hash(ckpt: dict[str, Any]) -> str:
    """SHA-256 of every field of a checkpoint except ``sha256`` itself (tensor bytes, dtypes, shapes, values)."""
    h = hashlib.sha256()
    _hash_update(h, {k: v for k, v in ckpt.items() if k != "sha256"})
    return h.hexdigest()


def _non_finite(state: Any) -> list[str]:
    """Names of floating-point tensors of a state dict that hold NaN or infinite values."""
    if not isinstance(state, dict):
        return []
    return [
        str(k) for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def model_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The final-model subset of a full (resume) payload: no optimiser, scheduler or RNG state."""
    return {k: v for k, v in payload.items() if k not in RESUME_ONLY_KEYS and k not in ("sha256", "kind")}


def save_checkpoint(path: str | Path, payload: dict[str, Any], kind: str | None = None) -> Path:
    """Write ``payload`` (see the module docstring) atomically with its content hash; return the final path.

    Args:
        path: Destination file.
        payload: Checkpoint fields (``format``/``version``/``sha256`` are (re)set here).
        kind: ``"model"`` (drop the resume-only fields), ``"resume"``, or None: ``"resume"`` when the payload
            holds an optimiser state, else ``"model"``.

    Raises:
        InputError: The model weights hold NaN or infinite values (nothing is written).
    """

    bad = _non_finite(payload.get("model"))
    if bad:
        raise InputError(path, f"refusing to write a checkpoint whose weights are not finite ({', '.join(bad[:3])})")
    kind = kind or ("resume" if "optimizer" in payload else "model")
    if kind not in ("model", "resume"):
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    body = model_payload(payload) if kind == "model" else {k: v for k, v in payload.items() if k != "sha256"}
    lat = body.get("lattice")
    if isinstance(lat, dict) and "lattice_type" not in lat:
        types = {str(t): lattice_type_for(t) for t in lat.get("technologies", [])}
        body = {**body, "lattice": {**lat, "lattice_type": {t: v for t, v in types.items() if v}}}
    ckpt = {**body, "format": FORMAT, "version": VERSION, "kind": kind}
    ckpt["sha256"] = content_hash(ckpt)
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)


def _snapshot(value: Any) -> Any:
    """A copy of nested dicts/lists whose tensors are cloned to CPU, safe to write while training goes on."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_snapshot(v) for v in value)
    return copy.deepcopy(value)


class BackgroundWriter:
    """Write checkpoints in a background thread so training does not wait for the disk.

    `submit` snapshots the payload (tensors cloned to CPU) on the caller's thread, then hashes and writes
    it (`save_checkpoint`, atomic) in a worker thread; at most one write is in flight (a new `submit`
    first waits for the previous one). `wait` returns the last path written and re-raises a failed
    write's error. Example::

        writer = BackgroundWriter()
        writer.submit(out / "resume.pt", payload, kind="resume")   # returns at once
        ...
        writer.wait()                                              # before the process ends
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last: Path | None = None

    def submit(self, path: str | Path, payload: dict[str, Any], kind: str | None = None) -> None:
        """Snapshot ``payload`` now and write it to ``path`` in the background."""
        self.wait()
        bad = _non_finite(payload.get("model"))
        if bad:  # refuse on the caller's thread, before anything is queued
            raise InputError(path, f"refusing to write a checkpoint whose weights are not finite ({', '.join(bad[:3])})")
        snap = _snapshot(payload)

        def work() -> None:
            try:
                self._last = save_checkpoint(path, snap, kind=kind)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
                self._error = exc

        self._thread = threading.Thread(target=work, name="hist-st-checkpoint", daemon=False)
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the write in flight is done; return the last path written; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return self._last


def _read_error(exc: Exception) -> str:
    """A short reason for a failed ``torch.load`` (never torch's advice to drop ``weights_only``)."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or type(exc).__name__ == "UnpicklingError":
        return ("the file holds pickled objects other than tensors and plain values (possibly code); "
                "hist-st reads checkpoints with weights_only=True and refuses such files")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"the file is truncated, corrupt or not a checkpoint ({type(exc).__name__}: {first[:200]})"


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, require: Sequence[str] = MODEL_KEYS
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check it; raise `InputError` naming the file.

    Args:
        path: A checkpoint file, or a run folder (its ``model.pt``).
        map_location: Where tensors are loaded.
        require: Fields that must be present.

    Checks: the format marker and version; the content hash (files that record one); the required
    fields; finite model weights.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise InputError(p, "checkpoint not found")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise InputError(p, f"cannot read as a hist-st checkpoint: {_read_error(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(p, "not a hist-st checkpoint (missing format marker)")
    try:
        version = int(ckpt.get("version", 0))
    except (TypeError, ValueError):
        raise InputError(p, f"not a hist-st checkpoint (version {ckpt.get('version')!r})") from None
    if version > VERSION:
        raise InputError(p, f"checkpoint version {ckpt['version']} is newer than this hist-st supports ({VERSION})")
    if "sha256" in ckpt and ckpt["sha256"] != content_hash(ckpt):
        raise InputError(
            p, "content hash mismatch: the file is corrupt or was modified after it was written; "
            "use an intact copy or retrain"
        )
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise InputError(p, f"checkpoint lacks field(s) {', '.join(missing)}")
    bad = _non_finite(ckpt.get("model"))
    if bad:
        raise InputError(p, f"model weights hold NaN or infinite values ({', '.join(bad[:3])}); the file is corrupt")
    return ckpt


def load_resume_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read the resume state of a run: ``resume.pt`` (or an older checkpoint holding both parts).

    Args:
        path: A ``resume.pt`` file, a full checkpoint of an older hist-st, or a run folder (its
            ``resume.pt``, else its ``model.pt`` when that still holds the optimiser state).

    Raises:
        InputError: No resume state (e.g. a final ``model.pt`` of a finished run), or a damaged file.
    """
    p = Path(path)
    if p.is_dir():
        if (p / RESUME_FILE).is_file():
            p = p / RESUME_FILE
        elif (p / MODEL_FILE).is_file():
            p = p / MODEL_FILE
        else:
            raise InputError(p / RESUME_FILE, "checkpoint not found (no resume state in this run folder)")
    ckpt = load_checkpoint(p, map_location, require=MODEL_KEYS)
    if ckpt.get("kind") == "model" or "optimizer" not in ckpt:
        epoch = ckpt.get("epoch")
        raise InputError(
            p, f"holds a final model (epoch {epoch}) without optimiser state; resume from the run's "
            f"{RESUME_FILE} (a finished run keeps none: there is nothing left to train)"
        )
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise InputError(p, f"resume state lacks field(s) {', '.join(missing)}")
    return ckpt


@dataclass
class ModelBundle:
    """A trained model with everything needed to predict a new slide.

    Attributes:
        model: The HiST module (eval mode).
        genes: Predicted genes, in output column order.
        embedding: Embedding key the model reads (``obsm['X_<embedding>']``).
        lattice_unit_um: Lattice unit (um) by technology, as used in training.
        spot_pitch_um: Spot pitch (um) by technology.
        target_mean: Training mean log1p per gene ``[G]``.
        feature_mean: Embedding mean ``[C]`` when the run standardised features, else None.
        feature_std: Embedding std ``[C]`` or None.
        config: The resolved training config as a dict.
        device: Device the model lives on.
        meta: The remaining checkpoint fields (epoch, history, versions).
        lattice_type: Spot lattice type (``"hex"``/``"square"``) by technology.
        inputs: How the training embeddings were made (`training_inputs`); empty for checkpoints that
            do not record it.
    """

    model: torch.nn.Module
    genes: list[str]
    embedding: str
    lattice_unit_um: dict[str, float] = field(default_factory=dict)
    spot_pitch_um: dict[str, float] = field(default_factory=dict)
    target_mean: torch.Tensor | None = None
    feature_mean: torch.Tensor | None = None
    feature_std: torch.Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    meta: dict[str, Any] = field(default_factory=dict)
    lattice_type: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def amp(self) -> bool:
        if self.device.type == "cpu":
            return bool(self.config.get("amp_cpu", False))
        return bool(self.config.get("amp", False)) and self.device.type == "cuda"

    def unit_for(self, technology: str) -> float | None:
        """Lattice unit for a slide of ``technology`` (the single recorded unit when only one exists)."""
        if technology in self.lattice_unit_um:
            return float(self.lattice_unit_um[technology])
        units = set(self.lattice_unit_um.values())
        return float(units.pop()) if len(units) == 1 else None


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild the model described by a checkpoint and return a `ModelBundle` (model in eval mode)."""

    ckpt = load_checkpoint(path, map_location="cpu")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    try:
        model = HiST(HiSTConfig.from_dict(dict(ckpt["model_config"])))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise InputError(path, f"the model in this checkpoint cannot be rebuilt ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from None
    model.to(device).eval()
    norm = ckpt.get("norm", {})
    lat = ckpt.get("lattice", {})
    types = {str(t): lattice_type_for(t) for t in lat.get("technologies", [])}
    types = {t: v for t, v in types.items() if v}
    types.update({str(k): str(v) for k, v in lat.get("lattice_type", {}).items()})
    return ModelBundle(
        model=model,
        genes=[str(g) for g in ckpt["genes"]],
        embedding=str(ckpt["embedding"]),
        lattice_unit_um={str(k): float(v) for k, v in lat.get("unit_um", {}).items()},
        spot_pitch_um={str(k): float(v) for k, v in lat.get("spot_pitch_um", {}).items()},
        target_mean=norm.get("target_mean"),
        feature_mean=norm.get("feature_mean") if norm.get("standardise_features") else None,
        feature_std=norm.get("feature_std") if norm.get("standardise_features") else None,
        config=dict(ckpt.get("config", {})),
        device=device,
        meta={k: ckpt[k] for k in ("epoch", "step", "history", "versions", "slides") if k in ckpt},
        lattice_type=types,
        inputs=dict(ckpt.get("inputs") or {}),
    )


def finished_epochs(run_dir: str | Path) -> int | None:
    """Epochs of a run in ``run_dir`` that finished all of them (``model.pt`` and no ``resume.pt``), else None."""
    run_dir = Path(run_dir)
    if (run_dir / RESUME_FILE).is_file() or not (run_dir / MODEL_FILE).is_file():
        return None
    ckpt = load_checkpoint(run_dir / MODEL_FILE)
    epochs = ckpt.get("config", {}).get("epochs")
    if epochs is None or int(ckpt.get("epoch", -1)) != int(epochs):  # older runs kept the optimiser in it
        return None
    return int(epochs)


def resume_source(run_dir: str | Path) -> Path:
    """What ``train --resume`` continues from: ``run_dir/resume.pt``, or the folder itself (an older hist-st
    kept the optimiser state in ``model.pt``)."""
    run_dir = Path(run_dir)
    return run_dir / RESUME_FILE if (run_dir / RESUME_FILE).is_file() else run_dir
