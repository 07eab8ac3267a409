"""Measured spot-grid geometry: pitch, hex or square layout, rotation, and the map to lattice sites.

Every spatial technology lays its spots (or bins, or pseudo-spots) on a regular grid, but the grid a
sample really has is not always the one its metadata or technology name suggests (Visium HD binned to
128 um while the metadata says 2 um; legacy ST printed at 110 um instead of 200 um; Xenium pseudo-spots
with no spacing at all). `measure_grid` reads the grid from the spot centres themselves:

- **pitch**: the median length of the neighbour vectors near the shortest common step (seeded by the
  10th percentile of nearest-neighbour distances, so sparse subsets of a grid measure right too);
- **kind**: ``"hex"`` when the neighbour directions repeat every 60 degrees, ``"square"`` every 90
  (six-fold vs four-fold circular concentration), ``"irregular"`` when neither is clear (or fewer than
  `MIN_STEPS` neighbour steps were found);
- **angle**: the direction of the grid's first axis in the image (degrees);
- **phase**: where the grid's rows and columns fall, so that spots map to integer sites exactly.

`grid_coords` maps spot centres to continuous lattice coordinates in which every true neighbour pair
lands on adjacent integer sites: rotate the grid upright, divide by the pitch (square) or use offset
coordinates (hex: rows ``pitch * sqrt(3) / 2`` apart, odd rows shifted back by half a pitch), so the six
hex neighbours of a spot all lie in its 3 x 3 neighbourhood. `neighbour_adjacency` measures how many
true neighbour pairs stay adjacent on a given lattice (the goal is 1.0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hist_st.errors import InputError

__all__ = ["GridGeometry", "Adjacency", "measure_grid", "grid_coords", "neighbour_pairs", "neighbour_adjacency"]

#: Neighbour vectors whose length is within this fraction of the pitch count as grid steps.
STEP_TOLERANCE = 0.25
#: Fewest neighbour steps (each pair counts twice) from which a grid type is called.
MIN_STEPS = 6
#: Quantile of the nearest-neighbour distances that seeds the pitch.
PITCH_QUANTILE = 0.1
#: Minimum circular concentration of neighbour directions to call a grid hex or square.
MIN_ORDER = 0.5
_SQRT3_2 = float(np.sqrt(3.0) / 2.0)


@dataclass(frozen=True)
class GridGeometry:
    """The spot grid of one sample, measured from its spot centres.

    Attributes:
        pitch_um: Centre-to-centre distance of neighbouring spots (um).
        kind: ``"hex"``, ``"square"`` or ``"irregular"``.
        angle_deg: Direction of the grid's first axis in image (x, y) coordinates, degrees; in
            ``(-30, 30]`` for hex, ``(-45, 45]`` for square, 0 for irregular.
        row_spacing_um: Distance between grid rows (``pitch * sqrt(3) / 2`` for hex, else the pitch).
        phase: ``(u, v)`` offsets in lattice units, in ``[0, 1)``, of the grid's sites in the rotated frame
            (used by `grid_coords` so that spots land on integer sites; depends on the image frame).
        order: Circular concentration of the neighbour directions (1 = perfect grid, 0 = none).
        n_spots: Number of spots measured.
        n_steps: Number of neighbour vectors that matched a grid step.
    """

    pitch_um: float
    kind: str
    angle_deg: float
    row_spacing_um: float
    phase: tuple[float, float] = (0.0, 0.0)
    order: float = 1.0
    n_spots: int = 0
    n_steps: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (what prepared slides store in ``meta['spot_grid']``)."""
        d = asdict(self)
        d["phase"] = [float(p) for p in self.phase]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GridGeometry:
        """Inverse of `as_dict`."""
        return cls(
            pitch_um=float(d["pitch_um"]),
            kind=str(d["kind"]),
            angle_deg=float(d["angle_deg"]),
            row_spacing_um=float(d["row_spacing_um"]),
            phase=tuple(float(p) for p in d.get("phase", (0.0, 0.0))),  # type: ignore[arg-type]
            order=float(d.get("order", 1.0)),
            n_spots=int(d.get("n_spots", 0)),
            n_steps=int(d.get("n_steps", 0)),
        )


@dataclass(frozen=True)
class Adjacency:
    """How many true neighbour pairs stay adjacent on a lattice.

    Attributes:
        n_pairs: Spot pairs closer than ``(1 + tolerance) * pitch`` (the true neighbours).
        n_adjacent: Of those, pairs whose lattice sites differ by at most 1 on both axes.
        share: ``n_adjacent / n_pairs`` (1.0 when there is no pair).
        max_site_distance: Largest lattice (max-norm) distance between true neighbours.
    """

    n_pairs: int
    n_adjacent: int
    share: float
    max_site_distance: int


def _check_xy(spatial: np.ndarray, source: str | None) -> np.ndarray:
    xy = np.asarray(spatial, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InputError(source, f"spot coordinates must have shape [N, 2], got {xy.shape}")
    if not np.all(np.isfinite(xy)):
        raise InputError(source, "spot coordinates contain NaN or infinite values")
    if len(xy) < 3:
        raise InputError(source, f"need at least 3 spots to measure their grid, got {len(xy)}")
    return xy


def _rotate(xy: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate points ``[N, 2]`` by ``-angle_deg`` (so a grid axis at ``angle_deg`` becomes the x axis)."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    return np.column_stack([c * xy[:, 0] + s * xy[:, 1], -s * xy[:, 0] + c * xy[:, 1]])


def _phase(values: np.ndarray) -> float:
    """Circular mean of ``values`` modulo 1, in ``[0, 1)``."""
    z = np.exp(2j * np.pi * values).mean()
    return float((np.angle(z) / (2 * np.pi)) % 1.0)


def measure_grid(spatial_px: np.ndarray, um_per_px: float, *, source: str | None = None) -> GridGeometry:
    """Measure the spot grid (pitch, hex/square, rotation, phase) from spot centres.

    Args:
        spatial_px: Spot centres ``[N, 2]`` (x, y) in full-resolution pixels, N >= 3.
        um_per_px: Microns per pixel.
        source: Name used in error messages.

    Returns:
        The `GridGeometry`. Spots missing from the grid (holes, partial tissue) do not change it.

    Raises:
        InputError: fewer than 3 spots, NaN coordinates, non-positive ``um_per_px``, coincident spots.
    """
    from scipy.spatial import cKDTree

    xy = _check_xy(spatial_px, source)
    if um_per_px is None or not np.isfinite(um_per_px) or um_per_px <= 0:
        raise InputError(source, f"um per pixel must be a positive number to measure the grid, got {um_per_px}")
    um = xy * float(um_per_px)
    k = min(7, len(um))
    dist, idx = cKDTree(um).query(um, k=k)
    d1 = dist[:, 1]
    if not np.all(d1 > 0):
        raise InputError(source, f"{int((d1 <= 0).sum())} spots share their centre with another spot")
    # The shortest grid step: a low quantile of the nearest-neighbour distances (robust to a few
    # misplaced spots, and right for sparse subsets of a grid, whose median neighbour is farther away).
    d_lo = float(np.quantile(d1, PITCH_QUANTILE, method="lower"))
    vec = um[idx[:, 1:]] - um[:, None, :]  # [N, k-1, 2]
    length = dist[:, 1:]
    pitch0 = float(np.median(length[np.abs(length - d_lo) <= STEP_TOLERANCE * d_lo]))
    step = np.abs(length - pitch0) <= STEP_TOLERANCE * pitch0
    v = vec[step]
    pitch = float(np.median(length[step]))
    theta = np.arctan2(v[:, 1], v[:, 0])
    z6 = np.exp(6j * theta).mean()
    z4 = np.exp(4j * theta).mean()
    r6, r4 = float(abs(z6)), float(abs(z4))
    if max(r6, r4) < MIN_ORDER or int(step.sum()) < MIN_STEPS:
        return GridGeometry(pitch, "irregular", 0.0, pitch, (0.0, 0.0), max(r6, r4), len(um), int(step.sum()))
    if r6 >= r4:
        kind, angle, row = "hex", float(np.rad2deg(np.angle(z6)) / 6.0), pitch * _SQRT3_2
    else:
        kind, angle, row = "square", float(np.rad2deg(np.angle(z4)) / 4.0), pitch
    rot = _rotate(um, angle)
    pv = _phase(rot[:, 1] / row)
    if kind == "hex":
        r = np.rint(rot[:, 1] / row - pv)
        pu = _phase(rot[:, 0] / pitch - 0.5 * r)
    else:
        pu = _phase(rot[:, 0] / pitch)
    return GridGeometry(pitch, kind, angle, row, (pu, pv), max(r6, r4), len(um), int(step.sum()))


def grid_coords(spatial_px: np.ndarray, um_per_px: float, geometry: GridGeometry) -> np.ndarray:
    """Continuous lattice coordinates of spot centres on a measured grid.

    Square: rotate the grid upright and divide by the pitch. Hex: rotate, divide x by the pitch and y by
    the row spacing, then shift odd rows back by half a pitch (offset coordinates), so each spot's six
    neighbours lie within one site on both axes. Irregular: rotate nothing, divide by the pitch.

    Args:
        spatial_px: Spot centres ``[N, 2]`` (x, y) in full-resolution pixels.
        um_per_px: Microns per pixel.
        geometry: The grid (`measure_grid`), measured in the same pixel frame.

    Returns:
        Float64 ``[N, 2]`` (x, y) lattice coordinates, minimum 0 on both axes; spots on the grid sit
        at integers (up to their measurement noise).
    """
    um = np.asarray(spatial_px, dtype=np.float64) * float(um_per_px)
    if geometry.kind == "irregular":
        xy = um / geometry.pitch_um
        return xy - xy.min(axis=0)
    rot = _rotate(um, geometry.angle_deg)
    pu, pv = geometry.phase
    v = rot[:, 1] / geometry.row_spacing_um - pv
    u = rot[:, 0] / geometry.pitch_um - pu
    if geometry.kind == "hex":
        r = np.rint(v)
        u = u - 0.5 * np.mod(r, 2)
    xy = np.column_stack([u, v])
    # translate by whole sites only, so the integer phase of the grid is kept
    return xy - np.floor(xy.min(axis=0) + 0.5)


def neighbour_pairs(spatial_px: np.ndarray, pitch_px: float, tolerance: float = STEP_TOLERANCE) -> np.ndarray:
    """Index pairs ``[P, 2]`` (i < j) of spots closer than ``(1 + tolerance) * pitch_px``."""
    from scipy.spatial import cKDTree

    xy = np.asarray(spatial_px, dtype=np.float64)
    pairs = cKDTree(xy).query_pairs((1.0 + tolerance) * float(pitch_px), output_type="ndarray")
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def neighbour_adjacency(
    spatial_px: np.ndarray, lattice: np.ndarray, pitch_px: float, tolerance: float = STEP_TOLERANCE
) -> Adjacency:
    """Share of true neighbour pairs (centres within ``(1 + tolerance) * pitch``) adjacent on the lattice.

    Args:
        spatial_px: Spot centres ``[N, 2]`` (pixels).
        lattice: Integer lattice sites ``[N, 2]`` of the same spots.
        pitch_px: Grid pitch in pixels (e.g. ``geometry.pitch_um / um_per_px``).
        tolerance: Relative slack on the neighbour distance.

    Returns:
        An `Adjacency`; adjacent means max-norm lattice distance <= 1 (the 3 x 3 neighbourhood).
    """
    lat = np.asarray(lattice, dtype=np.int64)
    pairs = neighbour_pairs(spatial_px, pitch_px, tolerance)
    if len(pairs) == 0:
        return Adjacency(0, 0, 1.0, 0)
    cheb = np.abs(lat[pairs[:, 0]] - lat[pairs[:, 1]]).max(axis=1)
    n_adj = int((cheb <= 1).sum())
    return Adjacency(int(len(pairs)), n_adj, n_adj / len(pairs), int(cheb.max()))
