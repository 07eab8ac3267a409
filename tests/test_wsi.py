"""Image back ends and spot-centred patch extraction on tiny synthetic images."""

from __future__ import annotations

import numpy as np
import pytest

from hist_st.errors import InputError
from hist_st.wsi import OpenSlideImage, PatchParams, PillowImage, TiffImage, extract_patches, open_image


def _gradient(w: int = 640, h: int = 480) -> np.ndarray:
    """R encodes x, G encodes y (both linear), B constant: patch means reveal where a patch was cut."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, np.full_like(x, 100)], -1).round().astype(np.uint8)


def _write_pyramid(path, img: np.ndarray, um_per_px: float, tile: int = 64, compression="zlib") -> None:
    import tifffile

    levels = [img, img[::2, ::2], img[::4, ::4]]
    res = (1e4 / um_per_px, 1e4 / um_per_px)
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            levels[0],
            tile=(tile, tile),
            subifds=len(levels) - 1,
            compression=compression,
            resolution=res,
            resolutionunit="CENTIMETER",
            photometric="rgb",
        )
        for lev in levels[1:]:
            tw.write(lev, tile=(tile, tile), compression=compression, subfiletype=1, photometric="rgb")


@pytest.fixture()
def pyramid(tmp_path):
    img = _gradient()
    path = tmp_path / "slide.tif"
    _write_pyramid(path, img, um_per_px=0.25)
    return path, img


def test_tiff_pyramid_levels_and_regions(pyramid):
    path, img = pyramid
    with open_image(path) as s:
        assert isinstance(s, TiffImage)
        assert (s.width, s.height) == (640, 480)
        assert s.level_downsamples == [1.0, 2.0, 4.0]
        assert s.um_per_px == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region(70, 30, 100, 90), img[30:120, 70:170])
        np.testing.assert_array_equal(s.read_level(10, 20, 50, 40, level=1), img[::2, ::2][20:60, 10:60])
        # partly outside: padded with white
        r = s.read_region(600, 450, 80, 60)
        np.testing.assert_array_equal(r[:30, :40], img[450:480, 600:640])
        assert (r[30:] == 255).all() and (r[:, 40:] == 255).all()
        assert s.best_level(3.0) == 1 and s.best_level(0.5) == 0 and s.best_level(10) == 2


def test_tiff_reads_only_needed_tiles(pyramid):
    path, _ = pyramid
    with open_image(path) as s:
        s.read_region(0, 0, 64, 64)
        assert len(s._cache) == 1  # one 64x64 tile, not the whole level
        s.read_region(0, 0, 64, 64, level=2)
        assert len(s._cache) == 2


def test_patch_centred_and_resampled(pyramid):
    path, img = pyramid
    centres = np.array([[320.0, 240.0], [100.0, 400.0]])
    # 32 px at 0.5 um/px = 16 um = 64 full-res px at 0.25 um/px -> read from level 1 (2x), no upsampling
    patches, outside = extract_patches(path, centres, params=PatchParams(32, 0.5))
    assert patches.shape == (2, 32, 32, 3) and not outside.any()
    for (cx, cy), p in zip(centres, patches):
        assert p[..., 0].mean() == pytest.approx(cx / 639 * 255, abs=1.5)
        assert p[..., 1].mean() == pytest.approx(cy / 479 * 255, abs=1.5)
        # the patch spans 64 full-res px: R changes by 64/639*255 ~ 25.5 across it
        assert float(p[16, -1, 0]) - float(p[16, 0, 0]) == pytest.approx(64 * 255 / 639, abs=3)


def test_patch_outside_is_padded_and_flagged(tmp_path):
    img = _gradient(200, 150)
    path = tmp_path / "he.png"
    from PIL import Image

    Image.fromarray(img).save(path)
    centres = np.array([[100.0, 75.0], [2.0, 2.0]])
    patches, outside = extract_patches(path, centres, slide_um_per_px=1.0, params=PatchParams(40, 1.0))
    assert outside.tolist() == [False, True]
    assert (patches[1, :10, :10] == 255).all()  # padding, not dropped
    np.testing.assert_array_equal(patches[0], img[55:95, 80:120])  # same resolution: an exact crop


def test_pillow_and_openslide_backends(tmp_path, pyramid):
    path, img = pyramid
    with OpenSlideImage(path) as s:
        assert (s.width, s.height) == (640, 480)
        np.testing.assert_array_equal(s.read_region(64, 64, 32, 32), img[64:96, 64:96])
    jpg = tmp_path / "he.jpg"
    from PIL import Image

    Image.fromarray(img).save(jpg, quality=95)
    with open_image(jpg) as s:
        assert isinstance(s, PillowImage) and s.um_per_px is None
        thumb, scale = s.thumbnail(64)
        assert max(thumb.shape[:2]) == 64 and scale == pytest.approx(0.1)


def test_bad_images(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_image(tmp_path / "missing.png")
    bad = tmp_path / "trunc.jpg"
    from PIL import Image

    Image.fromarray(_gradient(300, 200)).save(bad)
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(InputError, match="trunc.jpg"):
        open_image(bad)
    with pytest.raises(InputError, match="um per pixel"):
        extract_patches(
            open_image(tmp_path / "trunc.jpg") if False else _png(tmp_path), np.array([[5.0, 5.0]])
        )


def _png(tmp_path):
    from PIL import Image

    p = tmp_path / "ok.png"
    Image.fromarray(_gradient(50, 40)).save(p)
    return p
