"""Measured spot grids: pitch, hex/square, rotation; the grid map keeps every neighbour pair adjacent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hist_st.errors import InputError
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.lattice.geometry import GridGeometry, grid_coords, measure_grid, neighbour_adjacency
from hist_st.slide import Slide

HER2ST = Path(os.environ.get("HIST_ST_HER2ST", Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"))
VISIUM = Path(__file__).resolve().parents[2] / "shared" / "data" / "visium-heart" / "outs"


def grid(kind: str, pitch: float, rows: int = 14, cols: int = 16) -> np.ndarray:
    """Spot centres (um) of a hex (odd rows shifted by half a pitch) or square grid."""
    if kind == "hex":
        return np.array([((c + 0.5 * (r % 2)) * pitch, r * pitch * np.sqrt(3) / 2) for r in range(rows) for c in range(cols)])
    return np.array([(c * pitch, r * pitch) for r in range(rows) for c in range(cols)], dtype=np.float64)


def rotate(xy: np.ndarray, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return xy @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])


def brute_adjacency(xy: np.ndarray, lattice: np.ndarray, pitch: float) -> tuple[int, int]:
    """Reference: all pairs by a dense distance matrix, adjacency by max-norm on the lattice."""
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    i, j = np.nonzero(np.triu(d <= 1.25 * pitch, 1))
    cheb = np.abs(lattice[i] - lattice[j]).max(1)
    return len(i), int((cheb <= 1).sum())


@pytest.mark.parametrize("kind", ["hex", "square"])
@pytest.mark.parametrize("angle", [0.0, 8.0, -27.0, 40.0])
@pytest.mark.parametrize("pitch", [100.0, 110.0, 128.0])
def test_measure_grid_and_adjacency(kind, angle, pitch):
    rng = np.random.default_rng([int(pitch), int(angle) + 90])
    upp = 0.6
    um = rotate(grid(kind, pitch), angle) + 300.0
    keep = rng.random(len(um)) > 0.3  # holes: 30% of spots missing
    px = um[keep] / upp + rng.normal(0, 0.02 * pitch / upp, (int(keep.sum()), 2))
    g = measure_grid(px, upp)
    assert g.kind == kind
    assert g.pitch_um == pytest.approx(pitch, rel=0.01)
    period = 60.0 if kind == "hex" else 90.0
    delta = (g.angle_deg - angle + period / 2) % period - period / 2  # the grid looks the same every period
    assert abs(delta) < 0.5
    lat = to_lattice(grid_coords(px, upp, g))
    adj = neighbour_adjacency(px, lat, g.pitch_um / upp)
    n_pairs, n_adj = brute_adjacency(px, lat, g.pitch_um / upp)
    assert (adj.n_pairs, adj.n_adjacent) == (n_pairs, n_adj)
    assert adj.share == 1.0 and n_pairs > 0
    # the same spots on a lattice of the wrong unit (a fixed technology default) lose adjacency
    if kind == "square" and pitch != 200.0 and angle == 0.0:
        wrong = to_lattice(px * upp / 200.0)
        assert neighbour_adjacency(px, wrong, g.pitch_um / upp).share < 1.0


def test_hex_offset_coordinates_put_six_neighbours_in_3x3():
    um = grid("hex", 100.0, 6, 6)
    g = measure_grid(um, 1.0)
    xy = grid_coords(um, 1.0, g)
    np.testing.assert_allclose(xy, np.rint(xy), atol=1e-9)  # exact grid -> exact integer sites
    lat = np.rint(xy).astype(np.int64)
    assert len(np.unique(lat, axis=0)) == len(lat)
    # interior spot: its 6 neighbours at 100 um are exactly the spots within max-norm 1 but two corners
    d = np.sqrt(((um[:, None] - um[None]) ** 2).sum(-1))
    i = 2 * 6 + 2
    nb = np.flatnonzero(np.abs(d[i] - 100.0) < 1e-6)
    assert len(nb) == 6 and np.abs(lat[nb] - lat[i]).max() == 1


def test_irregular_points_and_errors():
    rng = np.random.default_rng(0)
    g = measure_grid(rng.uniform(0, 1000, (300, 2)), 1.0)
    assert g.kind == "irregular" and g.order < 0.5
    with pytest.raises(InputError, match="at least 3 spots"):
        measure_grid(np.zeros((2, 2)), 1.0)
    with pytest.raises(InputError, match="NaN"):
        measure_grid(np.array([[0, 0], [1, np.nan], [2, 2]], float), 1.0)
    with pytest.raises(InputError, match="um per pixel"):
        measure_grid(grid("square", 10.0, 3, 3), float("nan"))
    assert GridGeometry.from_dict(g.as_dict()) == g


def test_continuous_coords_follows_measured_grid():
    from hist_st.io._util import attach_lattice

    px = rotate(grid("hex", 100.0), 5.0) / 0.5 + 400
    s = Slide("s", px, np.array([f"b{i}" for i in range(len(px))], dtype=object), um_per_px=0.5,
              spot_pitch_um=100.0, lattice_unit_um=55.0, technology="visium")  # fmt: skip
    attach_lattice(s)
    assert s.meta["spot_grid"]["kind"] == "hex" and s.lattice_unit_um == pytest.approx(100.0, rel=1e-3)
    assert s.meta["neighbour_adjacency"]["share"] == 1.0 and s.meta["grid_check"]["agrees"]
    # a model trained with the authors' 55 um unit still gets its own (plain scaled) map
    np.testing.assert_allclose(continuous_coords(s, 55.0), (px - px.min(0)) * 0.5 / 55.0)
    # another slide's measured pitch (within 10%) selects this slide's own grid map
    np.testing.assert_allclose(continuous_coords(s, 101.0), continuous_coords(s))


@pytest.mark.skipif(not HER2ST.is_dir(), reason=f"her2st data not found at {HER2ST}")
def test_her2st_sections_keep_every_neighbour_adjacent():
    from hist_st.io._util import attach_lattice
    from hist_st.io.legacy_st import find_her2st_sections, read_her2st_section

    for sec in [s for s in find_her2st_sections(HER2ST) if s.slide_id in ("A1", "B4", "C2", "H3")]:
        s = read_her2st_section(sec)
        attach_lattice(s)
        assert s.meta["spot_grid"]["kind"] == "square", sec.slide_id
        assert s.meta["spot_grid"]["pitch_um"] == pytest.approx(200.0, rel=0.02)
        assert s.meta["neighbour_adjacency"]["share"] == 1.0


@pytest.mark.skipif(not VISIUM.is_dir(), reason=f"Visium heart sample not found at {VISIUM}")
def test_visium_heart_is_a_100um_hex_grid():
    from hist_st.io._util import attach_lattice
    from hist_st.io.spaceranger import read_spaceranger

    s = read_spaceranger(VISIUM, None)
    attach_lattice(s)
    g = s.meta["spot_grid"]
    assert g["kind"] == "hex" and g["pitch_um"] == pytest.approx(100.0, rel=0.02)
    assert s.meta["neighbour_adjacency"]["share"] == 1.0
