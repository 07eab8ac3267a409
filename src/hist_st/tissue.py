"""Tissue detection on a thumbnail and pseudo-spot grids for H&E-only prediction.

`detect_tissue` finds tissue on a low-resolution overview (Otsu threshold on the Lab colour distance from
the background colour estimated on the image border, then closing, hole filling and removal of specks). `pseudo_spot_grid` lays a hexagonal
(Visium-like) or square (legacy-ST-like) grid of spot centres at a given pitch over the detected tissue
and returns an H&E-only `Slide` (no counts) ready for patch extraction, embedding and prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hist_st.errors import InputError
from hist_st.slide import Slide
from hist_st.wsi import SlideImage, open_image

__all__ = ["TissueMask", "detect_tissue", "pseudo_spot_grid", "grid_points"]


@dataclass
class TissueMask:
    """A tissue mask on a thumbnail.

    Attributes:
        mask: bool ``[h, w]``, True on tissue.
        scale: Thumbnail pixels per full-resolution pixel.
        thumbnail: The RGB thumbnail ``[h, w, 3]`` uint8 the mask was computed on.
        threshold: The threshold used on the Lab colour distance from the background (border) colour.
    """

    mask: np.ndarray
    scale: float
    thumbnail: np.ndarray
    threshold: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """Whether full-resolution points ``[N, 2]`` (x, y) fall on tissue; bool ``[N]``."""
        p = np.floor(np.asarray(xy, dtype=np.float64) * self.scale).astype(np.int64)
        h, w = self.mask.shape
        ok = (p[:, 0] >= 0) & (p[:, 1] >= 0) & (p[:, 0] < w) & (p[:, 1] < h)
        out = np.zeros(len(p), dtype=bool)
        out[ok] = self.mask[p[ok, 1], p[ok, 0]]
        return out


def detect_tissue(
    image: SlideImage | str | Path | np.ndarray,
    *,
    max_size: int = 1024,
    scale: float | None = None,
    min_object_fraction: float = 0.001,
    closing_radius: int = 5,
    min_texture: float = 1.5,
) -> TissueMask:
    """Detect tissue on a thumbnail.

    Args:
        image: A `SlideImage`, an image path, or an RGB thumbnail ``[h, w, 3]`` uint8 (then give ``scale``).
        max_size: Longer side of the thumbnail computed from an image.
        scale: Thumbnail px per full-res px when ``image`` is an array (default 1.0).
        min_object_fraction: Tissue pieces smaller than this fraction of the thumbnail are dropped.
        closing_radius: Radius (thumbnail px) of the morphological closing that joins nearby tissue.
        min_texture: Minimum local standard deviation of Lab lightness (7x7 px, smoothed) for tissue; 0
            disables the texture test (smooth coloured regions are glare or uneven illumination).

    Returns:
        A `TissueMask`.

    Raises:
        InputError: no tissue found (blank or unreadable image).
    """
    from scipy import ndimage
    from skimage import color, filters, morphology

    source = "thumbnail"
    if isinstance(image, np.ndarray):
        thumb, sc = np.asarray(image, dtype=np.uint8)[..., :3], float(scale or 1.0)
    else:
        own = not isinstance(image, SlideImage)
        img = open_image(image) if own else image
        source = str(img.path)
        try:
            thumb, sc = img.thumbnail(max_size)
        finally:
            if own:
                img.close()
    rgb = thumb.astype(np.float32) / 255.0
    lab = color.rgb2lab(rgb)
    # Background = the colour of the image border (glass, possibly tinted); tissue differs from it.
    h, w = lab.shape[:2]
    bw = max(1, min(h, w) // 20)
    border = np.concatenate(
        [
            lab[:bw].reshape(-1, 3),
            lab[-bw:].reshape(-1, 3),
            lab[:, :bw].reshape(-1, 3),
            lab[:, -bw:].reshape(-1, 3),
        ]
    )
    bg = np.median(border, axis=0)
    score = np.sqrt(((lab - bg) ** 2).sum(-1))
    score = filters.gaussian(score, sigma=1.0)
    if float(np.percentile(score, 99.5) - np.percentile(score, 0.5)) < 3.0:
        raise InputError(source, "empty tissue: the image is uniform (no stained tissue found)")
    # Three classes (glass, pale tissue, stained tissue): keep both tissue classes. The cut is bounded below by
    # twice the colour noise of the border and above by 10 Lab units so pale stroma/fat is kept.
    noise = float(np.percentile(np.sqrt(((border - bg) ** 2).sum(-1)), 95))
    try:
        thr = float(filters.threshold_multiotsu(score, classes=3)[0])
    except ValueError:
        thr = float(filters.threshold_otsu(score))
    thr = float(np.clip(thr, max(4.0, 2.0 * noise), 10.0))
    mask = score > thr
    if min_texture > 0:
        # glare and uneven illumination are coloured but smooth; tissue has texture (nuclei, fibres)
        lum = lab[..., 0]
        m1 = ndimage.uniform_filter(lum, 7)
        m2 = ndimage.uniform_filter(lum * lum, 7)
        texture = ndimage.uniform_filter(np.sqrt(np.maximum(m2 - m1 * m1, 0.0)), 9)
        mask &= texture > min_texture
    val = rgb.max(-1)
    mask &= ~(val < 0.08)  # black scanner borders / padding are not tissue
    if closing_radius > 0:
        mask = ndimage.binary_closing(mask, structure=morphology.disk(closing_radius), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    min_px = max(4, int(min_object_fraction * mask.size))
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= min_px
        mask = keep[labels]
    if not mask.any():
        raise InputError(source, "empty tissue: no tissue region found on the thumbnail")
    return TissueMask(mask=mask, scale=sc, thumbnail=thumb, threshold=thr)


def grid_points(
    width: float, height: float, pitch_px: float, lattice: str = "hex"
) -> tuple[np.ndarray, np.ndarray]:
    """Grid of spot centres covering ``[0, width) x [0, height)``.

    Args:
        pitch_px: Centre-to-centre distance of neighbouring spots (pixels).
        lattice: ``"hex"`` (rows ``pitch * sqrt(3) / 2`` apart, odd rows shifted by half a pitch; array
            columns step by 2 as in Visium) or ``"square"``.

    Returns:
        ``(xy float64 [M, 2], array (row, col) int64 [M, 2])``.
    """
    if pitch_px <= 0:
        raise ValueError("pitch must be positive")
    if lattice == "hex":
        dy = pitch_px * np.sqrt(3) / 2
        rows = np.arange(int(np.floor((height - pitch_px / 2) / dy)) + 1)
        pts, rc = [], []
        for r in rows:
            off = pitch_px / 2 if r % 2 else 0.0
            cols = np.arange(int(np.floor((width - pitch_px / 2 - off) / pitch_px)) + 1)
            x = pitch_px / 2 + off + cols * pitch_px
            pts.append(np.column_stack([x, np.full(len(x), pitch_px / 2 + r * dy)]))
            rc.append(np.column_stack([np.full(len(x), r), 2 * cols + (r % 2)]))
        return np.concatenate(pts), np.concatenate(rc).astype(np.int64)
    if lattice == "square":
        nx = int(np.floor((width - pitch_px / 2) / pitch_px)) + 1
        ny = int(np.floor((height - pitch_px / 2) / pitch_px)) + 1
        cols, rows = np.meshgrid(np.arange(nx), np.arange(ny))
        rc = np.column_stack([rows.ravel(), cols.ravel()]).astype(np.int64)
        xy = pitch_px / 2 + rc[:, ::-1].astype(np.float64) * pitch_px
        return xy, rc
    raise InputError("lattice", f"unknown lattice {lattice!r}; use hex or square")


def pseudo_spot_grid(
    image: SlideImage | str | Path,
    *,
    pitch_um: float,
    lattice: str = "hex",
    lattice_unit_um: float | None = None,
    um_per_px: float | None = None,
    mask: TissueMask | None = None,
    slide_id: str | None = None,
    thumbnail_size: int = 1024,
) -> Slide:
    """An H&E-only `Slide` whose spots form a grid over the detected tissue.

    Args:
        image: The H&E image (path or open `SlideImage`).
        pitch_um: Spot centre-to-centre distance (the model's training pitch: Visium 100, legacy ST 200).
        lattice: ``"hex"`` or ``"square"`` (the model's training lattice type).
        lattice_unit_um: Lattice unit for `hist_st.lattice.continuous_coords` (default: 0.55 x pitch for hex,
            as Visium's 55 um for 100 um; the pitch for square).
        um_per_px: Image resolution; default: recorded in the image file.
        mask: A precomputed `TissueMask` (default: `detect_tissue` on the image).

    Returns:
        A `Slide` with ``counts=None``, technology ``"he-only"``, spatial grid centres on tissue, array
        coords, lattice sites, thumbnail; ``meta`` records the grid parameters.

    Raises:
        InputError: no resolution, or no grid point on tissue.
    """
    own = not isinstance(image, SlideImage)
    img = open_image(image) if own else image
    try:
        upp = um_per_px if um_per_px is not None else img.um_per_px
        if upp is None or not np.isfinite(upp) or upp <= 0:
            raise InputError(img.path, "the image records no um per pixel; give um_per_px (--um-per-px)")
        if mask is None:
            mask = detect_tissue(img, max_size=thumbnail_size)
        pitch_px = pitch_um / upp
        xy, rc = grid_points(img.width, img.height, pitch_px, lattice)
        on = mask.contains(xy)
        if not on.any():
            raise InputError(img.path, "empty tissue: no pseudo-spot falls on detected tissue")
        xy, rc = xy[on], rc[on]
        unit = (
            lattice_unit_um
            if lattice_unit_um is not None
            else (0.55 * pitch_um if lattice == "hex" else pitch_um)
        )
        slide = Slide(
            slide_id=slide_id or Path(img.path).stem.split(".")[0],
            spatial=xy,
            barcodes=np.asarray([f"ps_{r}_{c}" for r, c in rc], dtype=object),
            array_coords=rc,
            um_per_px=float(upp),
            spot_pitch_um=float(pitch_um),
            lattice_unit_um=float(unit),
            technology="he-only",
            image=str(img.path),
            thumbnail=mask.thumbnail,
            thumbnail_scale=mask.scale,
            meta={
                "pseudo_spots": {
                    "lattice": lattice,
                    "pitch_um": float(pitch_um),
                    "tissue_fraction": mask.fraction,
                    "tissue_threshold": mask.threshold,
                },
                "um_per_px_source": "given by the user"
                if um_per_px is not None
                else "recorded in the image file",
            },
        )
    finally:
        if own:
            img.close()
    from hist_st.io._util import attach_lattice

    attach_lattice(slide)
    return slide.validate()
