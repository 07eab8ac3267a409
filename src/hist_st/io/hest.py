"""HEST-1k samples: ``st/<id>.h5ad``, ``patches/<id>.h5``, ``metadata/<id>.json``, ``wsis/<id>.tif``.

Stored patches (224 px at 0.5 um/px, ``coords`` = top-left corners in full-resolution pixels) are used
when present, matched to spots by barcode; otherwise patches are cut from the WSI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hist_st.errors import InputError
from hist_st.io._util import TECHNOLOGY_PITCH_UM, normalise_technology

__all__ = ["HestSample", "find_hest_samples", "read_hest", "hest_patch_centres"]

WSI_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".svs", ".ndpi", ".mrxs", ".jpg", ".png")


@dataclass
class HestSample:
    """File locations of one HEST-1k sample (absent parts are None)."""

    sample_id: str
    root: Path
    st: Path
    metadata: Path | None
    patches: Path | None
    wsi: Path | None
    patient: str | None = None


def _find_wsi(root: Path, sid: str) -> Path | None:
    folder = root / "wsis"
    for suf in WSI_SUFFIXES:
        p = folder / f"{sid}{suf}"
        if p.is_file():
            return p
    return None


def _read_meta(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        return json.loads(path.read_text())
    except Exception as exc:
        raise InputError(path, f"cannot parse HEST metadata ({exc})") from exc


def find_hest_samples(root: str | Path) -> list[HestSample]:
    """All samples of a HEST-1k folder (one per ``st/<id>.h5ad``), sorted by id."""
    root = Path(root)
    st_dir = root / "st"
    if not st_dir.is_dir():
        raise InputError(root, "not a HEST-1k folder (needs st/<id>.h5ad)")
    out = []
    for st in sorted(st_dir.glob("*.h5ad")):
        sid = st.stem
        meta_p = root / "metadata" / f"{sid}.json"
        meta_p = meta_p if meta_p.is_file() else None
        patches = root / "patches" / f"{sid}.h5"
        meta = _read_meta(meta_p)
        patient = meta.get("patient")
        out.append(
            HestSample(
                sid,
                root,
                st,
                meta_p,
                patches if patches.is_file() else None,
                _find_wsi(root, sid),
                str(patient) if patient not in (None, "", "nan") else None,
            )
        )
    if not out:
        raise InputError(st_dir, "no <id>.h5ad sample found")
    return out


def hest_patch_centres(
    coords: np.ndarray, um_per_px: float, patch_px: int = 224, patch_um_per_px: float = 0.5
) -> np.ndarray:
    """Centres (full-res pixels) of HEST patches from their top-left ``coords`` ``[N, 2]``."""
    half = patch_px * patch_um_per_px / um_per_px / 2.0
    return np.asarray(coords, dtype=np.float64) + half


def read_hest(root: str | Path, sample_id: str, *, patient: str | None = None):
    """Read one HEST-1k sample into a `Slide`.

    um/px from ``pixel_size_um_estimated``; spot pitch from ``inter_spot_dist``; technology from
    ``st_technology``. ``slide.image`` is the WSI (None when absent); ``meta['hest_patches']`` the stored
    patches file.

    Raises:
        InputError: unreadable files, missing resolution.
    """
    from hist_st.io.anndata_reader import read_anndata

    root = Path(root)
    st = root / "st" / f"{sample_id}.h5ad"
    meta_p = root / "metadata" / f"{sample_id}.json"
    meta = _read_meta(meta_p if meta_p.is_file() else None)
    upp = meta.get("pixel_size_um_estimated")
    tech = normalise_technology(meta.get("st_technology"))
    pitch = meta.get("inter_spot_dist") or TECHNOLOGY_PITCH_UM.get(tech)
    wsi = _find_wsi(root, sample_id)
    slide = read_anndata(
        st,
        wsi,
        slide_id=sample_id,
        patient=patient or meta.get("patient"),
        technology=tech,
        um_per_px=float(upp) if upp else None,
        spot_pitch_um=float(pitch) if pitch else None,
    )
    if upp:
        slide.meta["um_per_px_source"] = "HEST metadata pixel_size_um_estimated"
    patches = root / "patches" / f"{sample_id}.h5"
    slide.meta.update(
        hest_metadata={k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None},
        hest_patches=str(patches) if patches.is_file() else None,
    )
    if slide.patient is not None:
        slide.patient = str(slide.patient)
    return slide
