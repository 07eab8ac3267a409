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
- ``history``: per-epoch records (loss, lr, strength, ...); ``versions``: package versions.

Files are written atomically (temporary name in the same folder, then rename).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hist_st.errors import InputError

__all__ = [
    "FORMAT",
    "ModelBundle",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "load_bundle",
    "package_versions",
    "lattice_type_for",
    "training_inputs",
]

FORMAT = "hist-st-checkpoint"
VERSION = 1

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


def package_versions() -> dict[str, str]:
    """Versions of hist-st and the packages that shape its numbers."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("hist-st", "torch", "numpy", "scipy", "anndata", "scanpy", "scikit-learn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


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


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (see the module docstring) atomically; return the final path."""
    from hist_st.slide import atomic_write

    lat = payload.get("lattice")
    if isinstance(lat, dict) and "lattice_type" not in lat:
        types = {str(t): lattice_type_for(t) for t in lat.get("technologies", [])}
        payload = {**payload, "lattice": {**lat, "lattice_type": {t: v for t, v in types.items() if v}}}
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; raise `InputError` for missing or foreign files."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise InputError(p, "checkpoint not found")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise InputError(p, f"cannot read as a hist-st checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(p, "not a hist-st checkpoint (missing format marker)")
    if int(ckpt.get("version", 0)) > VERSION:
        raise InputError(p, f"checkpoint version {ckpt['version']} is newer than this hist-st supports ({VERSION})")
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
        return bool(self.config.get("amp", False)) and self.device.type == "cuda"

    def unit_for(self, technology: str) -> float | None:
        """Lattice unit for a slide of ``technology`` (the single recorded unit when only one exists)."""
        if technology in self.lattice_unit_um:
            return float(self.lattice_unit_um[technology])
        units = set(self.lattice_unit_um.values())
        return float(units.pop()) if len(units) == 1 else None


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild the model described by a checkpoint and return a `ModelBundle` (model in eval mode)."""
    from hist_st.model import HiST
    from hist_st.model.config import HiSTConfig

    ckpt = load_checkpoint(path, map_location="cpu")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    model = HiST(HiSTConfig.from_dict(dict(ckpt["model_config"])))
    model.load_state_dict(ckpt["model"])
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
