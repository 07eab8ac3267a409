"""Continuous spot coordinates to a collision-free integer lattice.

HiST treats measured spots as a sparse field on an integer lattice (paper section 3.1). Coordinates
are divided by the lattice unit, rounded to the nearest site, collisions are moved to the nearest free
site, and the result is translated so that both minima are 0. Everything is vectorised int64 numpy:
no coordinate limit (the authors' code used int16) and no Python loop over spots.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hist_st.errors import InputError
from hist_st.lattice.geometry import GridGeometry, grid_coords
from hist_st.slide import Slide

__all__ = ["to_lattice", "continuous_coords"]

#: A lattice unit this close (relative) to a slide's measured pitch selects the slide's measured grid map.
GRID_UNIT_RTOL = 0.1


def _check_coords(coords: np.ndarray, source: str | Path | None) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InputError(source, f"coordinates must have shape [N, 2], got {coords.shape}")
    if coords.shape[0] == 0:
        raise InputError(source, "zero spots: cannot build a lattice")
    if not np.all(np.isfinite(coords)):
        raise InputError(source, "coordinates contain NaN or infinite values")
    return coords


def _offsets(radius: int) -> np.ndarray:
    """All integer offsets with max-norm <= radius, sorted by Euclidean length then lexicographically."""
    r = np.arange(-radius, radius + 1)
    off = np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
    order = np.lexsort((off[:, 1], off[:, 0], (off**2).sum(1)))
    return off[order]


def to_lattice(coords: np.ndarray, unit: float = 1.0, source: str | Path | None = None) -> np.ndarray:
    """Map continuous coordinates to unique, non-negative int64 lattice sites.

    Each point goes to its nearest site ``round(p / unit)``; when several points share a site, the one
    closest to it (ties: lowest row index) keeps it and the others move, in rounds, to the site nearest
    to them (Euclidean) among those still free; when several want the same site, the nearest wins and
    the others try again. So no site left free is nearer to a moved point than the site it got. The result is translated so that both minima are 0. A clean lattice (unique
    non-negative integers with both minima 0) is returned unchanged, so the map is idempotent.

    Args:
        coords: Coordinates ``[N, 2]`` in any unit.
        unit: Lattice spacing in the same unit.
        source: Name used in error messages (file or slide).

    Returns:
        Lattice sites ``[N, 2]`` int64, unique rows, ``min == 0`` on both axes. Deterministic.
    """
    coords = _check_coords(coords, source)
    if not unit > 0:
        raise InputError(source, f"lattice unit must be positive, got {unit}")
    x = coords / unit
    x = x - x.min(axis=0)
    site = np.rint(x).astype(np.int64)
    site = _resolve_collisions(x, site)
    return site - site.min(axis=0)


def _keys(site: np.ndarray, lo: np.ndarray, width: int) -> np.ndarray:
    return (site[..., 0] - lo[0]) * width + (site[..., 1] - lo[1])


def _resolve_collisions(x: np.ndarray, site: np.ndarray) -> np.ndarray:
    n = len(site)
    # Site keys in a frame wide enough for any displacement made below (at most n sites away).
    lo = site.min(0) - n
    width = int(site[:, 1].max() - lo[1] + n + 1)
    key = _keys(site, lo, width)
    dist = ((x - site) ** 2).sum(1)
    order = np.lexsort((np.arange(n), dist, key))  # by site, then distance, then index
    first = np.ones(n, dtype=bool)
    first[1:] = key[order][1:] != key[order][:-1]
    if first.all():
        return site
    occupied = np.sort(key[order][first])
    pending = np.sort(order[~first])  # points that lost their site
    radius = 1
    while len(pending):
        off = _offsets(radius)
        base = np.floor(x[pending])  # [P, 2]
        cand = base.astype(np.int64)[:, None, :] + off[None]  # [P, K, 2]
        ckey = _keys(cand, lo, width)
        pos = np.searchsorted(occupied, ckey)
        taken = occupied[np.minimum(pos, len(occupied) - 1)] == ckey
        cdist = ((x[pending][:, None, :] - cand) ** 2).sum(-1)
        cdist[taken] = np.inf
        best = cdist.argmin(1)
        bdist = cdist[np.arange(len(pending)), best]
        # The box [floor(x) - r, floor(x) + r] holds every site closer to x than r + 1 - max(frac(x)):
        # a free site found in the box is the nearest free site only within that distance.
        sure = (radius + 1 - (x[pending] - base).max(1)) ** 2
        has = np.isfinite(bdist) & (bdist <= sure)
        if not has.any():
            radius *= 2
            continue
        p, bkey, bd = pending[has], ckey[has, best[has]], bdist[has]
        # Several pending points may pick the same free site: the closest wins, the rest retry.
        order2 = np.lexsort((p, bd, bkey))
        win = np.ones(len(p), dtype=bool)
        win[1:] = bkey[order2][1:] != bkey[order2][:-1]
        winners = p[order2][win]
        site[winners] = cand[has][order2][win, best[has][order2][win]]
        occupied = np.sort(np.concatenate([occupied, bkey[order2][win]]))
        pending = np.setdiff1d(pending, winners)
    return site


def continuous_coords(slide: Slide, unit_um: float | None = None) -> np.ndarray:
    """Spot centres of ``slide`` in lattice units.

    When the slide carries a measured grid (``slide.meta['spot_grid']``, written by
    `hist_st.io._util.attach_lattice`) and the lattice unit is that grid's pitch, the grid's own map is
    used (`hist_st.lattice.geometry.grid_coords`: rotated upright, hex rows in offset coordinates), so
    every neighbour pair lands on adjacent sites (a unit within `GRID_UNIT_RTOL` of the pitch, e.g. the
    pitch another slide of the same technology measured, counts as the pitch). Otherwise ``(p - min p) * um_per_px / unit_um``.

    Args:
        slide: The slide; needs ``um_per_px`` and a lattice unit (``unit_um`` or
            ``slide.lattice_unit_um``), or else array coordinates, used as they are.
        unit_um: Lattice unit in microns, overriding the slide's (a unit other than the measured pitch,
            e.g. a model trained with the authors' 55 um Visium unit, gives the plain scaled map).

    Returns:
        Float64 ``[N, 2]`` (x, y) coordinates in lattice units, minimum 0 on both axes.
    """

    unit = unit_um if unit_um is not None else slide.lattice_unit_um
    spatial = np.asarray(slide.spatial, dtype=np.float64)
    grid = slide.meta.get("spot_grid") if isinstance(slide.meta, dict) else None
    grid = grid if isinstance(grid, dict) else None
    if grid and slide.um_per_px is not None and (unit is None or np.isclose(unit, grid["pitch_um"], rtol=GRID_UNIT_RTOL)):
        return grid_coords(spatial, slide.um_per_px, GridGeometry.from_dict(grid))
    if unit is not None and slide.um_per_px is not None:
        xy = spatial * (slide.um_per_px / unit)
    elif slide.array_coords is not None:
        xy = np.asarray(slide.array_coords, dtype=np.float64)[:, ::-1]  # (row, col) -> (x, y)
    else:
        raise InputError(
            f"slide {slide.slide_id!r}",
            "cannot place spots on a lattice: needs um_per_px and a lattice unit (um), or array coordinates",
        )
    return xy - xy.min(axis=0)
