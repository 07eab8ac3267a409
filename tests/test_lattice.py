"""Lattice properties against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hist_st.errors import InputError
from hist_st.lattice import build_batch, coarsen, rel_offset_index, to_lattice, window_partition


def _random_points(n: int, extent: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, extent, size=(n, 2))


@pytest.mark.parametrize("seed", range(5))
def test_to_lattice_unique_nonnegative_compact_deterministic(seed: int) -> None:
    pts = _random_points(400, 15.0, seed)  # dense: many collisions
    lat = to_lattice(pts)
    assert lat.dtype == np.int64
    assert len(np.unique(lat, axis=0)) == len(lat)
    assert (lat.min(0) == 0).all()
    np.testing.assert_array_equal(lat, to_lattice(pts.copy()))
    np.testing.assert_array_equal(to_lattice(lat), lat)  # idempotent


def test_to_lattice_keeps_uncollided_points_at_nearest_site() -> None:
    pts = np.array([[0.0, 0.0], [3.4, 1.6], [7.0, 7.0], [7.2, 6.9], [7.1, 7.3]])
    lat = to_lattice(pts)
    np.testing.assert_array_equal(lat[:2], [[0, 0], [3, 2]])
    # three points compete for (7, 7): the closest keeps it, the others take adjacent free sites
    np.testing.assert_array_equal(lat[2], [7, 7])
    assert np.abs(lat[3:] - [7, 7]).max() == 1


def test_to_lattice_clean_lattice_and_units() -> None:
    rng = np.random.default_rng(0)
    sites = np.unique(rng.integers(0, 50, size=(300, 2)), axis=0)
    sites -= sites.min(0)
    np.testing.assert_array_equal(to_lattice(sites), sites)
    np.testing.assert_array_equal(to_lattice(sites * 200.0 + 1234.5, unit=200.0), sites)


def test_to_lattice_no_coordinate_limit() -> None:
    pts = np.array([[0.0, 0.0], [1e12, 5.0], [40000.0, 70000.0]])
    lat = to_lattice(pts)
    assert lat[1, 0] == 10**12 and lat.max() > 32767


@pytest.mark.parametrize(
    "bad, problem",
    [
        (np.array([[0.0, np.nan], [1.0, 1.0]]), "NaN"),
        (np.zeros((0, 2)), "zero spots"),
        (np.zeros((3, 3)), "shape"),
    ],
)
def test_to_lattice_bad_input(bad: np.ndarray, problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        to_lattice(bad, source="slide.h5ad")


def _brute_force_union(coords: np.ndarray, w: int, shifted: bool) -> list[set[int]]:
    """Tokens in the same 2w x 2w window, standard or shifted by w, enumerated window by window."""
    side = 2 * w
    members: dict[tuple, set[int]] = {}
    for idx, (i, j) in enumerate(coords):
        for origin in ([0, w] if shifted else [0]):
            # the window containing (i, j) in the partition whose origin is (-origin, -origin)
            a = (i + origin) // side
            b = (j + origin) // side
            members.setdefault((origin, a, b), set()).add(idx)
    out = []
    for i, j in coords:
        nb: set[int] = set()
        for origin in ([0, w] if shifted else [0]):
            nb |= members[(origin, (i + origin) // side, (j + origin) // side)]
        out.append(nb)
    return out


def _partition_union(coords: np.ndarray, w: int, shifted: bool) -> list[set[int]]:
    c = torch.as_tensor(coords)
    std = window_partition(c, w, shifted=False)
    parts = [std]
    if shifted:
        parts.append(window_partition(c, w, shifted=True, exclude_key=std.token_window))
    out = [set() for _ in range(len(coords))]
    seen = [0] * len(coords)
    for p in parts:
        for q in range(len(coords)):
            row = p.mask[p.token_window[q], p.token_slot[q]]
            keys = p.index[p.token_window[q]][torch.isfinite(row)].tolist()
            seen[q] += len(keys)
            out[q] |= set(keys)
    # the two partitions are disjoint for every query: the union is counted once
    assert seen == [len(s) for s in out]
    return out


@pytest.mark.parametrize("extent", [6, 12, 18, 13, 31])
@pytest.mark.parametrize("shifted", [True, False])
def test_neighbourhoods_equal_brute_force(extent: int, shifted: bool) -> None:
    rng = np.random.default_rng(extent)
    grid = np.stack(np.meshgrid(np.arange(extent), np.arange(extent), indexing="ij"), -1).reshape(-1, 2)
    coords = grid[rng.random(len(grid)) < 0.6]
    coords = coords - coords.min(0)
    got = _partition_union(coords, 3, shifted)
    want = _brute_force_union(coords, 3, shifted)
    assert got == want
    assert max(len(s) for s in got) <= (63 if shifted else 36)


def test_shifted_partition_differs_on_multiple_of_six_extent() -> None:
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(12), indexing="ij"), -1).reshape(-1, 2)
    union = _partition_union(grid, 3, shifted=True)
    plain = _partition_union(grid, 3, shifted=False)
    assert sum(map(len, union)) > sum(map(len, plain))
    # an interior token of a full lattice sees 36 + 36 - 9 = 63 keys
    assert max(map(len, union)) == 63


def test_relative_offsets_match_coordinates() -> None:
    rng = np.random.default_rng(1)
    coords = torch.as_tensor(np.unique(rng.integers(0, 20, size=(150, 2)), axis=0))
    p = window_partition(coords, 3, shifted=True)
    padded = torch.cat([coords, coords.new_zeros(1, 2)])[p.index]
    valid = p.index < len(coords)
    pair = valid[:, :, None] & valid[:, None, :]
    delta = padded[:, None, :, :] - padded[:, :, None, :]
    assert (p.rel[pair] == rel_offset_index(delta, 3)[pair]).all()
    assert p.rel.min() >= 0 and p.rel.max() < 11 * 11


def test_coarsen_index_structure() -> None:
    rng = np.random.default_rng(2)
    coords = torch.as_tensor(np.unique(rng.integers(0, 40, size=(500, 2)), axis=0))
    down = coarsen(coords)
    np.testing.assert_array_equal(down.coarse_coords[down.parent].numpy(), (coords // 2).numpy())
    expected_slot = 2 * (coords[:, 0] % 2) + coords[:, 1] % 2
    assert (down.slot == expected_slot).all()
    # children[parent, slot] is the inverse map
    assert (down.children[down.parent, down.slot] == torch.arange(len(coords))).all()
    assert (down.children >= 0).sum() == len(coords)
    assert len(torch.unique(down.coarse_coords, dim=0)) == len(down.coarse_coords)


def test_build_batch_levels_and_errors() -> None:
    rng = np.random.default_rng(3)
    coords = np.unique(rng.integers(0, 64, size=(900, 2)), axis=0)
    b = build_batch(coords, torch.zeros(len(coords), 4), num_levels=3)
    assert [lv.down is None for lv in b.levels] == [False, False, True]
    np.testing.assert_array_equal(b.levels[2].coords.numpy(), np.unique(coords // 4, axis=0))
    with pytest.raises(InputError, match="unique"):
        build_batch(np.array([[0, 0], [0, 0]]), torch.zeros(2, 4), 1)
    with pytest.raises(InputError, match="non-negative"):
        build_batch(np.array([[0, -1], [0, 0]]), torch.zeros(2, 4), 1)
    with pytest.raises(InputError, match="features"):
        build_batch(np.array([[0, 1], [0, 0]]), torch.zeros(3, 4), 1)


def _free_site_nearer(x: np.ndarray, lat: np.ndarray) -> list[tuple[int, float, float]]:
    """Brute force: moved points for which a site left free is strictly nearer than the site they got.

    ``x`` are the continuous coordinates (minimum 0 on both axes), ``lat`` what `to_lattice` returned.
    """
    rounded = np.rint(x).astype(np.int64)
    shifts, counts = np.unique(rounded - lat, axis=0, return_counts=True)
    shift = shifts[counts.argmax()]  # the translation to_lattice applied (most points keep their site)
    occupied = {tuple(s) for s in (lat + shift).tolist()}
    bad = []
    for i in range(len(x)):
        site = lat[i] + shift
        d_got = float(((x[i] - site) ** 2).sum())
        if (site == rounded[i]).all():
            continue
        r = int(np.ceil(np.sqrt(d_got))) + 1
        base = np.floor(x[i]).astype(np.int64)
        for a in range(base[0] - r, base[0] + r + 2):
            for b in range(base[1] - r, base[1] + r + 2):
                d = float(((x[i] - (a, b)) ** 2).sum())
                if (a, b) not in occupied and d < d_got - 1e-9:
                    bad.append((i, d_got**0.5, d**0.5))
    return bad


def test_collisions_take_the_nearest_free_site() -> None:
    """Issue 16, item 8: a point pushed off its site goes to the nearest site still free (Euclidean), even
    when that site lies outside the 3 x 3 box centred on floor(x). The last point loses (2, 1); the free
    site (3, 1) is 1.02 from it, the only free site in the box, (0, 0), is 2.23 away."""
    pts = np.array([[2.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 2.0], [2.0, 0.0], [2.0, 2.0], [0.0, 1.0],
                    [0.0, 2.0], [0.0, -1.0], [1.98, 1.02]])  # fmt: skip
    lat = to_lattice(pts)
    np.testing.assert_array_equal(lat[-1] - lat[0], [1, 0])  # (3, 1) - (2, 1) before translation
    assert not _free_site_nearer(pts, lat)


@pytest.mark.parametrize("seed", range(4))
def test_no_free_site_is_nearer_than_the_one_taken(seed: int) -> None:
    """Dense random clusters (many collisions, several rounds): checked against a brute-force search."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 20, size=(6, 2))
    pts = (centres[rng.integers(6, size=300)] + rng.normal(scale=1.5, size=(300, 2)))
    pts -= pts.min(0)
    lat = to_lattice(pts)
    assert len(np.unique(lat, axis=0)) == len(lat)
    assert not _free_site_nearer(pts, lat)
