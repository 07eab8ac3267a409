"""HEST-1k samples: ``st/<id>.h5ad``, ``patches/<id>.h5``, ``metadata/<id>.json``, ``wsis/<id>.tif``.

Stored patches (224 px at 0.5 um/px, ``coords`` = top-left corners in full-resolution pixels) are used
when present, matched to spots by barcode; otherwise patches are cut from the WSI. HEST stores a patch
only for spots whose patch is at least 15% tissue: `read_patch_index` says which spots have one, and
the size attributes HEST's writer stores with the patches (``patch_size_src``/``patch_size`` in WSI
pixels, ``patch_size_target``, ``downsample``, ``pixel_size``) give the field of view, checked against
the spot centres.

Patients: HEST writes a blank patient as NaN and reuses names such as "Patient 1" across datasets, so
a sample's patient is ``"<dataset_title> / <patient>"`` (HEST-Benchmark groups by both), and None when
blank (`hest_patient`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hist_st.errors import InputError
from hist_st.io._util import TECHNOLOGY_PITCH_UM, normalise_technology
from hist_st.io.anndata_reader import read_anndata
from hist_st.slide import Slide
from hist_st.wsi import PatchParams

__all__ = [
    "HestSample",
    "HestPatchIndex",
    "find_hest_samples",
    "read_hest",
    "read_patch_index",
    "use_stored_patches",
    "STORED_FIELD_TOLERANCE",
    "read_hest_bench_splits",
    "hest_patient",
    "meta_value",
]

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
        out.append(
            HestSample(
                sid, root, st, meta_p, patches if patches.is_file() else None, _find_wsi(root, sid), hest_patient(meta)
            )
        )
    if not out:
        raise InputError(st_dir, "no <id>.h5ad sample found")
    return out


def meta_value(meta: dict, key: str):
    """``meta[key]``, or None when absent, blank, or NaN (HEST writes missing values as NaN)."""
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, str) and v.strip().lower() in ("", "nan", "none", "null", "n/a", "na"):
        return None
    return v


def hest_patient(meta: dict) -> str | None:
    """The patient group of a HEST sample: ``"<dataset_title> / <patient>"``; None when the patient is blank.

    HEST writes a blank patient as float NaN, and names such as "Patient 1" recur across datasets, so
    the patient alone would merge unrelated samples; HEST-Benchmark groups by (dataset, patient).
    """
    patient = meta_value(meta, "patient")
    if patient is None:
        return None
    dataset = meta_value(meta, "dataset_title")
    return f"{dataset} / {patient}" if dataset is not None else str(patient)


def _positive(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


@dataclass
class HestPatchIndex:
    """What a HEST ``patches/<id>.h5`` holds, without its images.

    Attributes:
        path: The file.
        barcodes: ``[M]`` barcodes of the stored patches (M <= spots: HEST skips patches < 15% tissue).
        coords: ``[M, 2]`` top-left corners (x, y) in full-resolution WSI pixels.
        size_px: Stored patch side in pixels (``img`` shape).
        size_src_px: Patch side in WSI pixels from the attributes (``patch_size_src`` or ``patch_size``,
            else ``patch_size_target * downsample``), None when the file records none.
        pixel_size_um: The ``pixel_size`` attribute (um per WSI pixel), None when absent.
        attrs: All attributes stored with ``img`` and ``coords``.
    """

    path: Path
    barcodes: np.ndarray
    coords: np.ndarray
    size_px: int
    size_src_px: float | None
    pixel_size_um: float | None
    attrs: dict

    def field_um(self, um_per_px: float, centres_px: np.ndarray | None = None) -> tuple[float, str]:
        """Side of the stored patches in microns and how it was found.

        From the size attributes when present, else from the coords: each top-left corner sits half a
        patch before its spot centre (``centres_px``: the matching spot centres ``[M, 2]``), to within
        the pixel HEST truncates.
        """
        upp = self.pixel_size_um or um_per_px
        if self.size_src_px is not None:
            return self.size_src_px * upp, f"size attributes ({self.size_src_px:g} WSI px at {upp:g} um/px)"
        if centres_px is None or len(centres_px) == 0:
            raise InputError(self.path, "records no patch size and no spot matches it; cannot tell its field of view")
        # HEST truncates corners to whole pixels (int(centre - size // 2)): centre - corner lies in
        # [size // 2, size // 2 + 1), whose midpoint is removed
        half = float(np.median(np.asarray(centres_px, dtype=np.float64) - self.coords)) - 0.5
        return 2.0 * half * um_per_px, "coords relative to the spot centres (no size attribute stored)"


def read_patch_index(path: str | Path) -> HestPatchIndex:
    """Read barcodes, corners and size attributes of a HEST patch file (not its images).

    Raises:
        InputError: unreadable file, missing ``img``/``coords``/``barcode``, mismatched lengths.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            for key in ("img", "coords", "barcode"):
                if key not in f:
                    raise InputError(path, f"no '{key}' dataset (not a HEST patch file?)")
            attrs = {**{k: _attr(v) for k, v in f["coords"].attrs.items()}, **{k: _attr(v) for k, v in f["img"].attrs.items()}}
            shape = f["img"].shape
            coords = np.asarray(f["coords"][:], dtype=np.float64).reshape(-1, 2)
            raw = np.asarray(f["barcode"][:]).reshape(-1)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read stored patches ({type(exc).__name__}: {exc})") from exc
    barcodes = np.asarray([b.decode() if isinstance(b, bytes) else str(b) for b in raw], dtype=object)
    if not (len(barcodes) == len(coords) == shape[0]):
        raise InputError(path, f"{shape[0]} images, {len(coords)} coords and {len(barcodes)} barcodes differ in number")
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise InputError(path, f"img has shape {tuple(shape)}; expected [N, size, size, 3]")
    src = _positive(attrs.get("patch_size_src")) or _positive(attrs.get("patch_size"))
    if src is None and _positive(attrs.get("patch_size_target")) and _positive(attrs.get("downsample")):
        src = float(attrs["patch_size_target"]) * float(attrs["downsample"])
    return HestPatchIndex(path, barcodes, coords, int(shape[1]), src, _positive(attrs.get("pixel_size")), attrs)


def _attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


#: Stored and asked patch fields of view may differ by this fraction (HEST rounds the size to pixels).
STORED_FIELD_TOLERANCE = 0.02


def use_stored_patches(slide: Slide, path: Path, params: PatchParams, *, has_wsi: bool) -> Path | None:
    """Check a HEST patch file against ``slide`` and decide how its patches are used (in place).

    The field of view comes from the file's size attributes (or, without them, from where the corners
    sit relative to the spot centres) and must match ``params.field_um``; otherwise patches are cut from
    the WSI, or the slide is refused when there is none. Every stored corner must sit half a patch before
    its spot centre (a file cut at another size or resolution would be mis-scaled). Spots without a stored
    patch (HEST keeps only patches with >= 15% tissue) are dropped, as HEST-Benchmark does (by barcode),
    and the number is recorded in ``slide.meta['spots_without_stored_patch']``.

    Returns:
        ``path`` when the stored patches are used, None when patches are to be cut from the WSI.

    Raises:
        InputError: no spot has a stored patch; corners off the spot centres; another field of view
            and no WSI.
    """

    index = read_patch_index(path)
    pos = {str(b): i for i, b in enumerate(index.barcodes)}
    rows = np.asarray([pos.get(str(b), -1) for b in slide.barcodes], dtype=np.int64)
    have = rows >= 0
    if not have.any():
        raise InputError(path, f"none of the {slide.n_spots} spots of the sample has a stored patch (barcodes differ)")
    centres = np.asarray(slide.spatial, dtype=np.float64)[have]
    field, how = index.field_um(slide.um_per_px, centres)
    half_px = field / slide.um_per_px / 2.0
    off = np.abs(centres - half_px - index.coords[rows[have]]).max()
    if off > max(2.0, 0.05 * 2 * half_px):
        raise InputError(
            path,
            f"stored patch corners are up to {off:.1f} px away from half a patch ({half_px:.1f} px) before their "
            f"spot centres; the patches were cut at another size or resolution than {how} says",
        )
    slide.meta["stored_patches"] = {"field_um": field, "field_from": how, "size_px": index.size_px}
    # HEST rounds corners to whole pixels: allow 2 WSI pixels besides the relative tolerance
    if abs(field - params.field_um) > max(STORED_FIELD_TOLERANCE * params.field_um, 2.0 * slide.um_per_px):
        if not has_wsi:
            raise InputError(
                path,
                f"stored patches cover {field:.1f} um ({how}) but {params.field_um:g} um were asked "
                "and there is no WSI to cut them from",
            )
        slide.meta["patches_from_wsi_because"] = f"stored patches cover {field:.1f} um, {params.field_um:g} um asked"
        return None
    n_missing = int((~have).sum())
    if n_missing:
        slide.take_spots(have)
        slide.meta["spots_without_stored_patch"] = {
            "dropped": n_missing,
            "kept": int(have.sum()),
            "why": "HEST stores patches only for spots with >= 15% tissue; spots without one are dropped, "
            "as HEST-Benchmark does (matched by barcode)",
        }
        warnings.warn(
            f"slide {slide.slide_id!r}: {n_missing} of {len(have)} spots have no stored patch in {path} "
            "(HEST keeps patches with >= 15% tissue); they are dropped, as in HEST-Benchmark",
            stacklevel=2,
        )
    return path


def read_hest_bench_splits(folder: str | Path) -> list[dict]:
    """HEST-Benchmark's fixed patient-level folds: ``splits/train_<i>.csv`` + ``test_<i>.csv``.

    Each CSV lists one sample per row in a ``sample_id`` column (HEST-Benchmark task folders, e.g.
    ``bench_data/IDC/splits``). The folds are returned as `hist_st.train.folds.make_folds` returns them,
    so ``hist-st cv --splits <folder>`` evaluates on exactly HEST-Benchmark's splits.

    Args:
        folder: The ``splits`` folder, or a task folder that contains one.

    Returns:
        ``[{"fold": i, "train": [...], "test": [...]}]``, ids sorted, folds in index order.

    Raises:
        InputError: no ``train_<i>.csv``/``test_<i>.csv`` pair, a CSV without ``sample_id``, a sample in
            both train and test of a fold.
    """
    import pandas as pd

    folder = Path(folder)
    if (folder / "splits").is_dir():
        folder = folder / "splits"
    pairs = []
    for train in sorted(folder.glob("train_*.csv")):
        idx = train.stem.split("_", 1)[1]
        if not idx.isdigit():
            continue
        test = folder / f"test_{idx}.csv"
        if not test.is_file():
            raise InputError(test, f"missing: {train.name} has no matching test split")
        pairs.append((int(idx), train, test))
    if not pairs:
        raise InputError(folder, "no HEST-Benchmark splits (train_<i>.csv and test_<i>.csv) found")
    folds = []
    for i, (_idx, train, test) in enumerate(sorted(pairs)):
        lists = []
        for path in (train, test):
            df = pd.read_csv(path, dtype=str)
            if "sample_id" not in df.columns:
                raise InputError(path, f"has no 'sample_id' column (columns: {list(df.columns)})")
            lists.append(sorted(df["sample_id"].dropna().astype(str).str.strip()))
        if set(lists[0]) & set(lists[1]):
            raise InputError(test, f"samples in both train and test: {sorted(set(lists[0]) & set(lists[1]))[:5]}")
        folds.append({"fold": i, "train": lists[0], "test": lists[1], "source": f"HEST-Benchmark {train.name}/{test.name}"})
    return folds


def read_hest(root: str | Path, sample_id: str, *, patient: str | None = None):
    """Read one HEST-1k sample into a `Slide`.

    um/px from ``pixel_size_um_estimated``; declared spot pitch from ``inter_spot_dist`` (NaN, as HEST
    writes it for Xenium, counts as unknown: the grid is measured from the spots by `hist-st prepare`);
    technology from ``st_technology``; patient from `hest_patient`. ``slide.image`` is the WSI (None
    when absent); ``meta['hest_patches']`` the stored patches file.

    Raises:
        InputError: unreadable files, missing resolution.
    """

    root = Path(root)
    st = root / "st" / f"{sample_id}.h5ad"
    meta_p = root / "metadata" / f"{sample_id}.json"
    meta = _read_meta(meta_p if meta_p.is_file() else None)
    upp = _positive(meta_value(meta, "pixel_size_um_estimated"))
    tech = normalise_technology(meta_value(meta, "st_technology"))
    pitch = _positive(meta_value(meta, "inter_spot_dist")) or TECHNOLOGY_PITCH_UM.get(tech)
    wsi = _find_wsi(root, sample_id)
    group = patient or hest_patient(meta)
    slide = read_anndata(
        st,
        wsi,
        slide_id=sample_id,
        patient=group,
        technology=tech,
        um_per_px=upp,
        spot_pitch_um=pitch,
    )
    if upp:
        slide.meta["um_per_px_source"] = "HEST metadata pixel_size_um_estimated"
    patches = root / "patches" / f"{sample_id}.h5"
    slide.meta.update(
        hest_metadata={
            k: meta_value(meta, k) for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None
        },
        hest_patches=str(patches) if patches.is_file() else None,
        patient_group="(dataset_title, patient)" if group and not patient else ("given" if patient else "unknown"),
    )
    if slide.patient is not None:
        slide.patient = str(slide.patient)
    return slide
