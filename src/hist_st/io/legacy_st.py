"""Legacy Spatial Transcriptomics (100 um spots, 200 um pitch, square grid) in the her2st layout.

Layout (Andersson et al. 2021, ``almaan/her2st``)::

    ST-cnts/<section>.tsv.gz             spots x genes raw counts; row names "<x>x<y>" (array position)
    ST-spotfiles/<section>_selection.tsv  x y new_x new_y pixel_x pixel_y selected
    ST-imgs/<patient>/<section>/*.jpg    H&E image

The resolution is not stored: it is derived from the pixel spacing of neighbouring array positions
(200 um apart) and recorded in ``slide.meta['um_per_px_source']``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hist_st.errors import InputError
from hist_st.io._util import check_counts, derive_um_per_px
from hist_st.slide import Slide

__all__ = ["read_legacy_st", "find_her2st_sections", "LegacySTSection", "ST_PITCH_UM", "read_her2st_section"]

ST_PITCH_UM = 200.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".svs", ".ndpi")


@dataclass
class LegacySTSection:
    """File locations of one legacy-ST section (``image`` is None when the H&E image is absent)."""

    slide_id: str
    patient: str
    counts: Path
    spots: Path
    image: Path | None


def read_legacy_st(
    counts_path: str | Path,
    spots_path: str | Path,
    image_path: str | Path | None = None,
    *,
    slide_id: str | None = None,
    patient: str | None = None,
    um_per_px: float | None = None,
) -> Slide:
    """Read one legacy-ST section.

    Args:
        counts_path: Spots x genes TSV (optionally gzipped), first column the ``<x>x<y>`` spot ids.
        spots_path: Spot selection TSV with ``x y pixel_x pixel_y`` (``new_x new_y selected`` optional).
        image_path: H&E image; None for a counts-only section.
        slide_id: Defaults to the counts file stem.
        patient: Patient id (her2st: the section's letter).
        um_per_px: Overrides the derived resolution.

    Returns:
        A `Slide` with technology ``"st"``, spot pitch and lattice unit 200 um, array coords (row, col)
        = (y, x), spatial = (pixel_x, pixel_y).

    Raises:
        InputError: unreadable files, missing columns, non-integer or negative counts, count rows without
            a spot position, no spot in common.
    """
    counts_path, spots_path = Path(counts_path), Path(spots_path)
    slide_id = slide_id or counts_path.name.split(".")[0]
    for p in (counts_path, spots_path):
        if not p.is_file():
            raise InputError(p, "file not found")
    try:
        cnt = pd.read_csv(counts_path, sep="\t", index_col=0)
    except Exception as exc:
        raise InputError(counts_path, f"cannot read the counts table ({type(exc).__name__}: {exc})") from exc
    try:
        spots = pd.read_csv(spots_path, sep="\t")
    except Exception as exc:
        raise InputError(spots_path, f"cannot read the spot table ({type(exc).__name__}: {exc})") from exc
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need <= set(spots.columns):
        raise InputError(
            spots_path, f"missing columns {sorted(need - set(spots.columns))}; expected x y pixel_x pixel_y"
        )
    if cnt.shape[0] == 0 or cnt.shape[1] == 0:
        raise InputError(counts_path, "the counts table is empty")
    if not all(np.issubdtype(t, np.number) for t in cnt.dtypes.unique()):
        raise InputError(counts_path, "the counts table has non-numeric entries")
    spots = _check_spot_table(spots, spots_path, ("x", "y", "selected"))
    if "selected" in spots.columns:
        spots = spots[spots["selected"] == 1]
    spots = _check_spot_table(spots, spots_path, ("pixel_x", "pixel_y", "new_x", "new_y"))  # spots in use only
    spots["x"] = spots["x"].round().astype(int)
    spots["y"] = spots["y"].round().astype(int)
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    _check_duplicate_spots(spots, spots_path)
    spots = spots[~spots.index.duplicated()]
    cnt.index = cnt.index.astype(str).str.strip()
    repeated = sorted(set(cnt.index[cnt.index.duplicated()]))
    if repeated:
        raise InputError(counts_path, f"{len(repeated)} spot name(s) label more than one count row (first: {repeated[:3]})")
    orphan = ~cnt.index.isin(spots.index)
    if orphan.any():
        first = list(cnt.index[orphan][:3])
        if orphan.all():
            raise InputError(
                counts_path,
                f"none of the {len(cnt)} count rows matches a selected spot of {spots_path.name} (count rows "
                f"{first}, spots {list(spots.index[:3])}); the two files belong to different sections?",
            )
        raise InputError(
            counts_path,
            f"{int(orphan.sum())} of {len(cnt)} count rows have no selected spot in {spots_path.name} (first: {first})",
        )
    bc = [b for b in cnt.index]
    spots_in = spots.loc[bc]
    n_no_counts = int(len(spots) - len(bc))
    counts = check_counts(cnt.to_numpy(), counts_path)
    pixel = spots_in[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    array_xy = (
        spots_in[["new_x", "new_y"]].to_numpy(np.float64)
        if {"new_x", "new_y"} <= set(spots.columns)
        else (spots_in[["x", "y"]].to_numpy(np.float64))
    )
    meta: dict = {
        "counts_file": str(counts_path),
        "spots_file": str(spots_path),
        "spots_without_counts": n_no_counts,
    }
    if um_per_px is None:
        um_per_px, how = derive_um_per_px(array_xy, pixel, ST_PITCH_UM, spots_path, labels=[f"spot {b}" for b in bc],
                                         check_placement=True)
        meta["um_per_px_source"] = how
    else:
        meta["um_per_px_source"] = "given by the user"
    return Slide(
        slide_id=slide_id,
        spatial=pixel,
        barcodes=np.asarray(bc, dtype=object),
        genes=np.asarray([str(g) for g in cnt.columns], dtype=object),
        counts=counts,
        array_coords=spots_in[["y", "x"]].to_numpy(np.int64),
        um_per_px=float(um_per_px),
        spot_pitch_um=ST_PITCH_UM,
        lattice_unit_um=ST_PITCH_UM,
        technology="st",
        patient=patient,
        image=str(image_path) if image_path else None,
        meta=meta,
    )


def _check_spot_table(spots: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A copy with ``columns`` (those present) numeric and finite; errors name the file line (the table's
    row index is the file's row order, so line = index + 2)."""
    spots = spots.copy()
    for col in columns:
        if col not in spots.columns:
            continue
        values = pd.to_numeric(spots[col], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
        if bad.any():
            lines = [int(i) + 2 for i in spots.index[bad][:3]]  # line 1 is the header
            raise InputError(
                path, f"{int(bad.sum())} row(s) have a missing, non-numeric or infinite {col!r} (line(s) {lines})"
            )
        spots[col] = values
    return spots


def _check_duplicate_spots(spots: pd.DataFrame, path: Path) -> None:
    """Refuse two rows for one array position with different pixel centres (which one is right?)."""
    dup = spots.index.duplicated(keep=False)
    if not dup.any():
        return
    for name, rows in spots[dup].groupby(level=0, sort=True):
        xy = rows[["pixel_x", "pixel_y"]].to_numpy(np.float64)
        if (np.abs(xy - xy[0]) > 1e-6).any():
            where = ", ".join(f"({a:.6g}, {b:.6g})" for a, b in xy[:3])
            raise InputError(
                path, f"spot {name} is listed {len(rows)} times with different pixel coordinates {where}; "
                "keep one row per spot",
            )


def _find_image(root: Path, patient: str, section: str) -> Path | None:
    for folder in (root / "ST-imgs" / patient / section, root / "ST-imgs" / section):
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                return files[0]
    return None


def find_her2st_sections(root: str | Path) -> list[LegacySTSection]:
    """All sections of a her2st-layout folder, sorted by id; ``image`` None where the image is absent."""
    root = Path(root)
    cdir, sdir = root / "ST-cnts", root / "ST-spotfiles"
    if not cdir.is_dir() or not sdir.is_dir():
        raise InputError(root, "not a her2st-layout folder (needs ST-cnts/ and ST-spotfiles/)")
    out = []
    for cpath in sorted(cdir.glob("*.tsv*")):
        section = cpath.name.split(".")[0]
        spath = sdir / f"{section}_selection.tsv"
        if not spath.is_file():
            continue
        patient = section.rstrip("0123456789") or section
        out.append(LegacySTSection(section, patient, cpath, spath, _find_image(root, patient, section)))
    if not out:
        raise InputError(
            root, "no section has both ST-cnts/<id>.tsv[.gz] and ST-spotfiles/<id>_selection.tsv"
        )
    return out


def read_her2st_section(section: LegacySTSection, um_per_px: float | None = None) -> Slide:
    """Read a section found by `find_her2st_sections`."""
    return read_legacy_st(
        section.counts,
        section.spots,
        section.image,
        slide_id=section.slide_id,
        patient=section.patient,
        um_per_px=um_per_px,
    )
