"""Tissue detection and pseudo-spot grids."""

from __future__ import annotations

import numpy as np
import pytest

from hist_st.errors import InputError
from hist_st.tissue import detect_tissue, grid_points, pseudo_spot_grid


def _tissue_image(tmp_path, w=400, h=300):
    """Tinted glass with a smooth glare patch, and a textured purple disc of radius 100 px at (150, 150)."""
    import tifffile

    rng = np.random.default_rng(0)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (235, 228, 238)
    yy, xx = np.mgrid[:h, :w]
    glare = np.exp(-((xx - 340) ** 2 + (yy - 50) ** 2) / (2 * 30.0**2))[..., None]
    img = img * (1 - glare) + np.array([240, 190, 225]) * glare  # smooth pink glare: coloured, not tissue
    disc = (xx - 150) ** 2 + (yy - 150) ** 2 < 100**2
    tex = rng.normal(0, 35, size=(h, w, 1))
    img[disc] = (np.array([170, 110, 190]) + tex[disc]).clip(0, 255)
    path = tmp_path / "he.tif"
    tifffile.imwrite(
        path,
        img.astype(np.uint8),
        photometric="rgb",
        resolution=(1e4 / 2.0, 1e4 / 2.0),
        resolutionunit="CENTIMETER",
    )
    return path, disc


def test_detect_tissue(tmp_path):
    path, disc = _tissue_image(tmp_path)
    m = detect_tissue(path, max_size=400)
    assert m.scale == 1.0 and m.mask.shape == disc.shape
    iou = (m.mask & disc).sum() / (m.mask | disc).sum()
    assert iou > 0.9
    assert not m.mask[20:80, 300:380].any()  # the glare is not tissue
    assert m.contains(np.array([[150.0, 150.0], [390.0, 10.0]])).tolist() == [True, False]


def test_grid_points():
    xy, rc = grid_points(1000, 1000, 100, "square")
    assert len(xy) == 100 and xy.min() == 50 and xy.max() == 950
    xy, rc = grid_points(1000, 1000, 100, "hex")
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(d[len(xy) // 2, 1:], 100, rtol=1e-9)  # six neighbours at the pitch
    assert (rc[:, 1] % 2 == rc[:, 0] % 2).all()  # Visium array convention
    with pytest.raises(InputError):
        grid_points(10, 10, 1, "triangle")


@pytest.mark.parametrize("lattice", ["hex", "square"])
def test_pseudo_spot_grid(tmp_path, lattice):
    path, disc = _tissue_image(tmp_path)
    s = pseudo_spot_grid(path, pitch_um=40.0, lattice=lattice, thumbnail_size=400)  # 2 um/px from the TIFF
    assert s.counts is None and s.technology == "he-only" and s.um_per_px == 2.0
    area_px = np.pi * 100**2
    cell = (20**2) * (np.sqrt(3) / 2 if lattice == "hex" else 1.0)
    assert abs(s.n_spots - area_px / cell) / (area_px / cell) < 0.15
    r = np.hypot(s.spatial[:, 0] - 150, s.spatial[:, 1] - 150)
    assert (r < 100 + 8).all()  # on the disc, up to the few px the smoothing adds at its edge
    assert s.lattice is not None and len(np.unique(s.lattice, axis=0)) == s.n_spots
    assert s.lattice_unit_um == (22.0 if lattice == "hex" else 40.0)
    assert s.thumbnail is not None


def test_empty_tissue_and_missing_resolution(tmp_path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((100, 120, 3), 240, np.uint8)).save(blank)
    with pytest.raises(InputError, match="empty tissue"):
        detect_tissue(blank)
    with pytest.raises(InputError, match="um per pixel"):
        pseudo_spot_grid(blank, pitch_um=100)


def test_real_her2st_pseudo_spots_cover_real_spots(her2st_dir):
    from scipy.spatial import cKDTree

    from hist_st.io import find_her2st_sections, read_her2st_section

    sec = next(s for s in find_her2st_sections(her2st_dir) if s.slide_id == "C5")
    real = read_her2st_section(sec)
    ps = pseudo_spot_grid(real.image, pitch_um=200, lattice="square", um_per_px=real.um_per_px)
    tol = 0.75 * 200 / real.um_per_px
    d_real, _ = cKDTree(ps.spatial).query(real.spatial)
    d_ps, _ = cKDTree(real.spatial).query(ps.spatial)
    assert (d_real < tol).mean() > 0.95  # the tissue the real spots cover is covered
    assert (d_ps < tol).mean() > 0.9  # and little beyond it


def test_pseudo_spots_embedded(tmp_path):
    from hist_st.embed import embed_he_slide
    from hist_st.encoders import ENCODERS, Encoder
    from hist_st.slide import read_prepared, write_prepared

    def tiny(weights=None, device=None):
        import torch

        torch.manual_seed(0)
        m = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 8, 8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
        return Encoder("tiny-tissue", m.eval(), 4, 32)

    ENCODERS["tiny-tissue"] = tiny
    try:
        path, _ = _tissue_image(tmp_path)
        s = pseudo_spot_grid(path, pitch_um=40.0, lattice="hex", thumbnail_size=400)
        embed_he_slide(s, encoder="tiny-tissue", patch_px=32, patch_um_per_px=2.0, progress=False)
        assert s.embeddings["tiny-tissue"].shape == (s.n_spots, 4) and s.patch_outside.shape == (s.n_spots,)
        back = read_prepared(write_prepared(s, tmp_path / "he.h5ad"))
        assert back.counts is None and back.technology == "he-only" and back.lattice is not None
    finally:
        ENCODERS.pop("tiny-tissue", None)
