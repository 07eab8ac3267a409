"""Helpers shared by the readers: count checks and resolution derivation."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.lattice.geometry import measure_grid, neighbour_adjacency
from hist_st.slide import DEFAULT_LATTICE_UNIT_UM


def check_counts(counts: sp.spmatrix | np.ndarray, source: str | Path) -> sp.csr_matrix:
    """Return ``counts`` as CSR float32 after checking they are finite, non-negative integers."""
    m = sp.csr_matrix(counts)
    data = m.data
    if data.size:
        if not np.all(np.isfinite(data)):
            raise InputError(source, "counts contain NaN or infinite values")
        if (data < 0).any():
            raise InputError(
                source, f"counts contain {int((data < 0).sum())} negative values; raw counts expected"
            )
        frac = np.abs(data - np.round(data))
        if (frac > 1e-4).any():
            raise InputError(
                source,
                f"{int((frac > 1e-4).sum())} counts are not integers (normalised or log data?); raw counts expected",
            )
    return sp.csr_matrix(m, dtype=np.float32)


def misplaced_spots(array_xy: np.ndarray, pixel_xy: np.ndarray, tolerance: float = 0.5) -> np.ndarray:
    """Indices of spots whose pixel centre lies more than ``tolerance`` array steps from where their array
    position puts them, under a robust (Theil-Sen) line per axis that a few wild spots cannot drag.

    Args:
        array_xy: ``[N, 2]`` array positions.
        pixel_xy: ``[N, 2]`` pixel centres.
        tolerance: Allowed distance in array steps (0.5: half the pitch).

    Returns:
        Sorted int64 indices (empty when every spot fits).
    """
    from scipy.stats import theilslopes

    array_xy = np.asarray(array_xy, dtype=np.float64)
    pixel_xy = np.asarray(pixel_xy, dtype=np.float64)
    bad = np.zeros(len(array_xy), dtype=bool)
    for k in range(2):
        a, p = array_xy[:, k], pixel_xy[:, k]
        if len(a) < 3 or np.ptp(a) <= 0:
            continue
        slope, intercept, *_ = theilslopes(p, a)
        if not np.isfinite(slope) or slope == 0:
            continue
        bad |= np.abs(p - (slope * a + intercept)) > tolerance * abs(slope)
    return np.flatnonzero(bad)


def derive_um_per_px(
    array_xy: np.ndarray,
    pixel_xy: np.ndarray,
    um_per_array_unit: float,
    source,
    labels=None,
    check_placement: bool = False,
) -> tuple[float, str]:
    """Microns per pixel from the pixel spacing of array positions.

    Fits ``pixel = a * array + b`` per axis (least squares over all spots) and returns
    ``um_per_array_unit / mean(|a_x|, |a_y|)`` and a sentence saying how it was derived.

    Args:
        array_xy: ``[N, 2]`` array (grid) x, y positions (may be sub-grid corrected, float).
        pixel_xy: ``[N, 2]`` pixel x, y centres.
        um_per_array_unit: Microns between neighbouring array positions (legacy ST: 200).
        labels: Spot names ``[N]`` for errors (default: row numbers).
        check_placement: Refuse spots far from their array position (`misplaced_spots`); for arrays whose
            axes follow the image axes (legacy ST).

    Raises:
        InputError: Non-finite coordinates, spots more than half a pitch from their array position
            (`misplaced_spots`, named), too few positions, or inconsistent spacing along x and y.
    """
    array_xy = np.asarray(array_xy, dtype=np.float64)
    pixel_xy = np.asarray(pixel_xy, dtype=np.float64)
    names = [str(v) for v in labels] if labels is not None else [f"row {i}" for i in range(len(array_xy))]
    finite = np.isfinite(array_xy).all(axis=1) & np.isfinite(pixel_xy).all(axis=1)
    if not finite.all():
        first = [names[i] for i in np.flatnonzero(~finite)[:3]]
        raise InputError(source, f"{int((~finite).sum())} spot(s) have NaN or infinite coordinates (first: {first})")
    off = misplaced_spots(array_xy, pixel_xy) if check_placement else []
    if len(off):
        first = ", ".join(f"{names[i]} at pixel ({pixel_xy[i, 0]:.6g}, {pixel_xy[i, 1]:.6g})" for i in off[:3])
        raise InputError(
            source,
            f"{len(off)} spot(s) lie more than half a spot pitch from where their array position puts them "
            f"({first}); their pixel coordinates are wrong (outside the image?) - fix or drop those rows",
        )
    slopes = []
    for k in range(2):
        a = array_xy[:, k]
        if np.ptp(a) <= 0:
            continue
        slope = np.polyfit(a, pixel_xy[:, k], 1)[0]
        slopes.append(abs(slope))
    if not slopes or min(slopes) <= 0:
        raise InputError(source, "cannot derive um per pixel: spots do not span two array positions")
    if len(slopes) == 2 and abs(slopes[0] - slopes[1]) / max(slopes) > 0.1:
        raise InputError(
            source,
            f"inconsistent pixel spacing of array positions along x ({slopes[0]:.1f} px) and y ({slopes[1]:.1f} px)",
        )
    px_per_unit = float(np.mean(slopes))
    upp = um_per_array_unit / px_per_unit
    how = (
        f"derived from the pixel spacing of neighbouring array positions: {px_per_unit:.2f} px per "
        f"{um_per_array_unit:g} um (least-squares fit of pixel vs array coordinates)"
    )
    return upp, how


NN_PITCH_SOURCE = "median nearest-neighbour distance of spot centres"


def fill_pitch(slide) -> None:
    """Unknown technology: spot pitch from the median nearest-neighbour distance; lattice unit = pitch.

    Called before `attach_lattice` (which then measures the grid) on a slide with ``um_per_px`` set.
    """
    if slide.spot_pitch_um is None:
        slide.spot_pitch_um = float(nn_distance_px(slide.spatial) * slide.um_per_px)
        slide.meta["spot_pitch_source"] = NN_PITCH_SOURCE
    if slide.lattice_unit_um is None:
        slide.lattice_unit_um = slide.spot_pitch_um


def attach_lattice(slide) -> None:
    """Measure the slide's spot grid and set ``slide.lattice`` from it.

    The grid (pitch, hex/square, rotation; `hist_st.lattice.geometry.measure_grid`) is measured from the
    spot centres and stored in ``slide.meta['spot_grid']``; ``slide.spot_pitch_um`` becomes the measured pitch
    (the declared one is kept in ``meta['grid_check']``). The lattice unit becomes the measured pitch
    too, so that `hist_st.lattice.continuous_coords` maps every neighbour pair to adjacent sites, unless
    the caller chose another unit on purpose (a unit that is neither the technology default nor the
    declared pitch is kept, e.g. a model's training unit for pseudo-spots). A warning is issued when
    the measurement disagrees with the declared pitch or the technology's grid type (`grid_check`).
    ``meta['neighbour_adjacency']`` records the share of true neighbour pairs adjacent on the lattice.
    Without um per pixel or with fewer than 3 spots, the slide's own unit is used as before.
    """

    source = f"slide {slide.slide_id!r}"
    geom = None
    if slide.um_per_px is not None and slide.n_spots >= 3:
        geom = measure_grid(slide.spatial, slide.um_per_px, source=source)
        given = _finite(slide.spot_pitch_um)
        estimated = slide.meta.get("spot_pitch_source") == NN_PITCH_SOURCE  # `fill_pitch`'s guess, not metadata
        check = grid_check(geom, slide.technology, None if estimated else given, source=source)
        unit = _finite(slide.lattice_unit_um)
        chosen = unit is not None and not any(
            ref is not None and np.isclose(unit, ref, rtol=1e-6)
            for ref in (DEFAULT_LATTICE_UNIT_UM.get(slide.technology), check["declared_pitch_um"], given)
        )
        slide.meta["spot_grid"] = geom.as_dict()
        slide.meta["grid_check"] = check
        slide.spot_pitch_um = geom.pitch_um
        if chosen:
            slide.meta["lattice_unit_source"] = f"kept as given ({unit:g} um)"
        else:
            slide.lattice_unit_um = geom.pitch_um
            slide.meta["lattice_unit_source"] = f"measured {geom.kind} grid pitch"
        if check["warning"]:
            warnings.warn(check["warning"], GridWarning, stacklevel=2)
    slide.lattice = np.asarray(to_lattice(continuous_coords(slide)), dtype=np.int64)
    if geom is not None:
        adj = neighbour_adjacency(slide.spatial, slide.lattice, geom.pitch_um / slide.um_per_px)
        slide.meta["neighbour_adjacency"] = asdict(adj)


class GridWarning(UserWarning):
    """A sample's measured spot grid disagrees with its metadata or technology."""


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def grid_check(
    geometry, technology: str, declared_pitch_um: float | None, *, source: str | None = None
) -> dict:
    """Compare a measured grid with the declared pitch and the technology's grid type.

    Args:
        geometry: The measured `hist_st.lattice.geometry.GridGeometry`.
        technology: Normalised technology name (`normalise_technology`).
        declared_pitch_um: Pitch from the sample's metadata (or the technology default), None if unknown.
        source: Name used in the warning.

    Returns:
        ``{"declared_pitch_um", "declared_kind", "measured_pitch_um", "measured_kind", "agrees",
        "warning"}``; ``warning`` is None when they agree (pitch within `PITCH_TOLERANCE`, same kind).
    """
    declared_pitch = declared_pitch_um if declared_pitch_um is not None else TECHNOLOGY_PITCH_UM.get(technology)
    declared_kind = TECHNOLOGY_GRID.get(technology)
    problems = []
    if declared_pitch is not None and abs(geometry.pitch_um - declared_pitch) > PITCH_TOLERANCE * declared_pitch:
        problems.append(f"spot pitch {declared_pitch:g} um declared")
    if declared_kind is not None and geometry.kind != declared_kind:
        problems.append(f"a {declared_kind} grid expected for {technology}")
    warning = None
    if problems:
        warning = (
            f"{source + ': ' if source else ''}the spots form a {geometry.kind} grid with a "
            f"{geometry.pitch_um:.1f} um pitch (measured on {geometry.n_spots} spots), but "
            + " and ".join(problems)
            + "; using the measured grid"
        )
    return {
        "declared_pitch_um": declared_pitch,
        "declared_kind": declared_kind,
        "measured_pitch_um": geometry.pitch_um,
        "measured_kind": geometry.kind,
        "agrees": not problems,
        "warning": warning,
    }


# Visium: neighbouring spots in a row are 2 array columns and 100 um apart; rows are 100*sqrt(3)/2 um apart.
VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_UM = 55.0
VISIUM_SCALEFACTOR_SPOT_UM = 65.0  # Space Ranger's spot_diameter_fullres spans a theoretical 65 um spot


def derive_hex_um_per_px(
    array_rc: np.ndarray, pixel_xy: np.ndarray, pitch_um: float, source
) -> tuple[float, str]:
    """Microns per pixel of a Visium-like hexagonal array from an affine fit of pixels on array (row, col).

    One array-column step is half the pitch (pitch_um / 2) along a row.
    """
    rc = np.asarray(array_rc, dtype=np.float64)
    xy = np.asarray(pixel_xy, dtype=np.float64)
    if len(np.unique(rc[:, 1])) < 2 or len(np.unique(rc[:, 0])) < 2:
        raise InputError(source, "cannot derive um per pixel: spots do not span two array rows and columns")
    design = np.column_stack([rc[:, 1], rc[:, 0], np.ones(len(rc))])
    coef, *_ = np.linalg.lstsq(design, xy, rcond=None)  # [3, 2]
    px_per_col = float(np.hypot(*coef[0]))
    upp = (pitch_um / 2.0) / px_per_col
    how = (
        f"derived from the pixel spacing of neighbouring array positions: {2 * px_per_col:.2f} px per "
        f"{pitch_um:g} um (affine fit of pixel vs array coordinates)"
    )
    return upp, how


def nn_distance_px(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance between spot centres (pixels)."""
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        raise InputError(None, "need at least two spots to measure their spacing")
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


TECHNOLOGY_ALIASES = {
    "visium": "visium",
    "visium hd": "visium-hd",
    "visium-hd": "visium-hd",
    "spatial transcriptomics": "st",
    "st": "st",
    "legacy st": "st",
    "xenium": "xenium",
}
#: Nominal spot pitch per technology (um): a cross-check for the measured grid, never a substitute for it.
TECHNOLOGY_PITCH_UM = {"visium": 100.0, "st": 200.0}
#: Grid type per technology: Visium spots are hexagonally packed; legacy ST spots, Visium HD bins and
#: HEST's Xenium pseudo-spots sit on square grids.
TECHNOLOGY_GRID = {"visium": "hex", "st": "square", "visium-hd": "square", "xenium": "square"}
#: Relative difference between measured and declared pitch above which `grid_check` warns.
PITCH_TOLERANCE = 0.1


def normalise_technology(name: str | None) -> str:
    if not name:
        return "unknown"
    return TECHNOLOGY_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
