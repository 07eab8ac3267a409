"""Tissue detection on a thumbnail and pseudo-spot grids for H&E-only prediction.

`detect_tissue` finds tissue on a low-resolution overview (Otsu threshold on the Lab colour distance from
the background colour estimated on the image border, a texture test, removal of Visium fiducial dots, then
closing, hole filling and removal of specks), and refuses images without tissue-like structure (blank,
noise, photographs that are not H&E). `pseudo_spot_grid` lays a hexagonal
(Visium-like) or square (legacy-ST-like) grid of spot centres at a given pitch over the detected tissue
and returns an H&E-only `Slide` (no counts) ready for patch extraction, embedding and prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hist_st.errors import InputError
from hist_st.io._util import attach_lattice
from hist_st.lattice.geometry import measure_grid
from hist_st.slide import Slide
from hist_st.wsi import SlideImage, open_image

__all__ = ["TissueMask", "detect_tissue", "remove_fiducials", "pseudo_spot_grid", "grid_points", "grid_phase"]


@dataclass
class TissueMask:
    """A tissue mask on a thumbnail.

    Attributes:
        mask: bool ``[h, w]``, True on tissue.
        scale: Thumbnail pixels per full-resolution pixel.
        thumbnail: The RGB thumbnail ``[h, w, 3]`` uint8 the mask was computed on.
        threshold: The threshold used on the Lab colour distance from the background (border) colour.
        n_fiducials: Fiducial dots removed (Visium frames).
    """

    mask: np.ndarray
    scale: float
    thumbnail: np.ndarray
    threshold: float
    n_fiducials: int = 0

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
    _check_structure(lab, source)
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
    mask, n_fiducials = remove_fiducials(mask)
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
    _check_stain_colour(lab, mask, source)
    return TissueMask(mask=mask, scale=sc, thumbnail=thumb, threshold=thr, n_fiducials=n_fiducials)


#: Smoothed-to-raw lightness variance below which an image has no spatial structure (noise: ~0.02;
#: H&E thumbnails measured here 0.6-0.8).
MIN_STRUCTURE = 0.15
#: H&E stains are pink to purple: the median tissue colour has a clearly positive Lab a* and a hue angle
#: atan2(b*, a*) between blue-purple and pink (her2st and Visium H&E measured here: a* 12-15, hue -58 to
#: -32 degrees; skimage's photographs: astronaut +57, coffee +53, chelsea +62, rocket a* 3.1).
MIN_TISSUE_A, TISSUE_HUE_DEG = 5.0, (-75.0, 35.0)


def _check_structure(lab: np.ndarray, source: str) -> None:
    from skimage import filters

    lum = lab[..., 0]
    var = float(lum.var())
    coherence = float(filters.gaussian(lum, sigma=2.0).var()) / max(var, 1e-9)
    if coherence < MIN_STRUCTURE:
        raise InputError(
            source,
            f"no tissue-like structure: lightness varies pixel to pixel without spatial coherence "
            f"(smoothed/raw variance {coherence:.3f} < {MIN_STRUCTURE}); is this noise or a corrupt image?",
        )


def _check_stain_colour(lab: np.ndarray, mask: np.ndarray, source: str) -> None:
    a = float(np.median(lab[..., 1][mask]))
    b = float(np.median(lab[..., 2][mask]))
    hue = float(np.degrees(np.arctan2(b, a)))
    lo, hi = TISSUE_HUE_DEG
    if a < MIN_TISSUE_A or not lo <= hue <= hi:
        raise InputError(
            source,
            f"the detected regions do not have H&E colours (median Lab a* {a:.1f}, b* {b:.1f}, hue {hue:.0f} deg; "
            f"hematoxylin and eosin give a* >= {MIN_TISSUE_A:g} and a hue of {lo:g} to {hi:g} deg); is this an "
            "H&E image?",
        )


def remove_fiducials(mask: np.ndarray, min_dots: int = 12) -> tuple[np.ndarray, int]:
    """Remove Visium fiducial dots (and the frame they form) from a raw tissue mask.

    Fiducials are many small, round, equally sized blobs separated by glass; tissue is large or, where it
    breaks into small pieces, surrounded by more tissue. Components (holes filled) that are round
    (filling > 40% of their bounding box), isolated (< 30% foreground in a ring one diameter wide
    around them) and whose size is within a factor 2 of the median such blob (3.5 for elongated runs of
    touching dots) are removed, when there are at least ``min_dots`` of them.

    Args:
        mask: bool ``[h, w]`` raw mask (before closing).

    Returns:
        ``(mask without fiducials, number of dots removed)``.
    """
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(filled)
    if n < min_dots:
        return mask, 0
    max_area = 0.002 * mask.size
    cands = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == i
        area = int(comp.sum())
        hh, ww = comp.shape
        if area < 4 or area > max_area or max(hh, ww) > 3.5 * min(hh, ww) or area < 0.4 * hh * ww:
            continue
        d = min(hh, ww)
        y0, y1 = max(sl[0].start - d, 0), min(sl[0].stop + d, mask.shape[0])
        x0, x1 = max(sl[1].start - d, 0), min(sl[1].stop + d, mask.shape[1])
        window = filled[y0:y1, x0:x1]
        own = labels[y0:y1, x0:x1] == i
        ring = window.size - own.sum()
        if ring > 0 and (window & ~own).sum() / ring < 0.3:
            cands.append((i, area, max(hh, ww) <= 1.5 * min(hh, ww)))
    single = [a for _, a, round_ in cands if round_]
    if len(single) < min_dots:
        return mask, 0
    med = float(np.median(single))
    # single dots, and runs of up to 3 touching dots along the frame
    dots = [i for i, a, round_ in cands if 0.5 * med <= a <= (2.0 if round_ else 3.5) * med]
    if len(dots) < min_dots:
        return mask, 0
    remove = np.isin(labels, dots)
    remove = ndimage.binary_dilation(remove, iterations=2)
    return mask & ~remove, len(dots)


def _rotate(xy: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate points ``[N, 2]`` counter-clockwise (in x, y) by ``angle_deg``."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.asarray(xy, dtype=np.float64) @ rot.T


def grid_points(
    width: float,
    height: float,
    pitch_px: float,
    lattice: str = "hex",
    origin: tuple[float, float] | None = None,
    angle_deg: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Grid of spot centres covering ``[0, width) x [0, height)``.

    Args:
        pitch_px: Centre-to-centre distance of neighbouring spots (pixels).
        lattice: ``"hex"`` (rows ``pitch * sqrt(3) / 2`` apart, odd rows shifted by half a pitch; array
            columns step by 2 as in Visium) or ``"square"``.
        origin: A point the grid must pass through (its phase, e.g. a measured spot of the same section);
            default: the first spot half a pitch from the top-left corner.
        angle_deg: Direction of the grid's rows in the image (degrees; 0 = horizontal rows).

    Returns:
        ``(xy float64 [M, 2], array (row, col) int64 [M, 2])``; array coordinates count from the first grid
        row and column inside the image.
    """
    if pitch_px <= 0:
        raise ValueError("pitch must be positive")
    if lattice not in ("hex", "square"):
        raise InputError("lattice", f"unknown lattice {lattice!r}; use hex or square")
    dy = pitch_px * np.sqrt(3) / 2 if lattice == "hex" else pitch_px
    o = np.asarray(origin if origin is not None else (pitch_px / 2, pitch_px / 2), dtype=np.float64)
    corners = _rotate(np.array([[0.0, 0.0], [width, 0.0], [0.0, height], [width, height]]) - o, -angle_deg)
    (umin, vmin), (umax, vmax) = corners.min(0), corners.max(0)
    uv, rc = [], []
    for r in range(int(np.ceil(vmin / dy)), int(np.floor(vmax / dy)) + 1):
        off = pitch_px / 2 if (lattice == "hex" and r % 2) else 0.0
        cols = np.arange(int(np.ceil((umin - off) / pitch_px)), int(np.floor((umax - off) / pitch_px)) + 1)
        u = off + cols * pitch_px
        uv.append(np.column_stack([u, np.full(len(u), r * dy)]))
        steps = np.rint(u / (pitch_px / 2)).astype(np.int64) if lattice == "hex" else cols
        rc.append(np.column_stack([np.full(len(u), r), steps]))
    if not uv:
        return np.zeros((0, 2)), np.zeros((0, 2), np.int64)
    xy = _rotate(np.concatenate(uv), angle_deg) + o
    rc_all = np.concatenate(rc).astype(np.int64)
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < width) & (xy[:, 1] < height)
    xy, rc_all = xy[inside], rc_all[inside]
    if not len(xy):
        return np.zeros((0, 2)), np.zeros((0, 2), np.int64)
    rc_all[:, 0] -= rc_all[:, 0].min()
    step = 2 if lattice == "hex" else 1  # hex: keep each column's parity (neighbours differ by 1 across rows)
    rc_all[:, 1] -= (rc_all[:, 1].min() // step) * step
    return xy, rc_all


def grid_phase(
    reference_xy: np.ndarray, pitch_px: float, lattice: str, angle_deg: float | None = None
) -> tuple[tuple[float, float], float]:
    """The origin and rotation that put a pseudo-spot grid on the measured spots of a reference section.

    The rotation is the reference's measured grid angle (`hist_st.lattice.geometry.measure_grid`) when it
    forms a grid of the same kind, else 0. The reference spot nearest the median position anchors the grid;
    the mean residual of all reference spots from their nearest grid point then refines it.

    Returns:
        ``((x, y) origin in px, angle in degrees)``.
    """
    from scipy.spatial import cKDTree


    xy = np.asarray(reference_xy, dtype=np.float64)
    if angle_deg is None:
        angle_deg = 0.0
        if len(xy) >= 3:
            geom = measure_grid(xy, 1.0)
            if geom.kind == lattice:
                angle_deg = float(geom.angle_deg)
    anchor = xy[np.argmin(((xy - np.median(xy, 0)) ** 2).sum(1))]
    lo, hi = xy.min(0) - 2 * pitch_px, xy.max(0) + 2 * pitch_px
    pts, _ = grid_points(hi[0] - lo[0], hi[1] - lo[1], pitch_px, lattice, origin=tuple(anchor - lo), angle_deg=angle_deg)
    d, j = cKDTree(pts + lo).query(xy)
    near = d < 0.5 * pitch_px
    if near.any():
        anchor = anchor + np.mean(xy[near] - (pts + lo)[j[near]], axis=0)
    return (float(anchor[0]), float(anchor[1])), float(angle_deg)


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
    origin: tuple[float, float] | None = None,
    angle_deg: float = 0.0,
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
        origin: Grid phase: a point the grid passes through (`grid_phase` of a reference section).
        angle_deg: Direction of the grid's rows (degrees; `grid_phase` of a reference section).

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
        xy, rc = grid_points(img.width, img.height, pitch_px, lattice, origin=origin, angle_deg=angle_deg)
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
            obs=pd.DataFrame(
                {"in_tissue": np.ones(len(rc), np.int64), "array_row": rc[:, 0], "array_col": rc[:, 1],
                 "pxl_col_in_fullres": xy[:, 0], "pxl_row_in_fullres": xy[:, 1]},
                index=pd.Index([f"ps_{r}_{c}" for r, c in rc]),
            ),
            meta={
                "pseudo_spots": {
                    "lattice": lattice,
                    "pitch_um": float(pitch_um),
                    "origin_px": list(origin) if origin is not None else None,
                    "angle_deg": float(angle_deg),
                    "tissue_fraction": mask.fraction,
                    "tissue_threshold": mask.threshold,
                    "fiducial_dots_removed": int(mask.n_fiducials),
                },
                "um_per_px_source": "given by the user"
                if um_per_px is not None
                else "recorded in the image file",
            },
        )
    finally:
        if own:
            img.close()

    attach_lattice(slide)
    return slide.validate()
