"""Tissue-detection benchmark (``hist-st bench tissue``): labelled spots, fiducial frames, non-tissue images.

Measured against labels that exist independently of the detector:

- **her2st** (legacy ST): recall = share of the spots the authors selected as under tissue whose centre the
  mask calls tissue; glass = the array positions (33 x 35 grid, placed by an affine fit of pixel on array
  coordinates of the selected spots) that were not selected and lie more than one pitch from any selected
  spot (the tissue border is ambiguous at spot scale), and the share of them the mask calls tissue.
- **Space Ranger** folders: recall of ``in_tissue`` spots and, when ``tissue_positions*`` lists
  out-of-tissue capture spots, the share of those called tissue; pseudo-spots of a Visium grid (100 um hex)
  laid over the mask, and the share of them outside the capture area (on the fiducial frame or beyond:
  the full 78 x 128 array placed by an affine fit of pixel on array coordinates, plus half a pitch).
- **Refusals**: a noise image, a blank image and photographs from scikit-image must be refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.errors import InputError
from hist_st.io.legacy_st import find_her2st_sections
from hist_st.io.spaceranger import read_scalefactors, read_tissue_positions, resolve_image_scale
from hist_st.jsonio import write_json
from hist_st.tissue import detect_tissue, grid_points
from hist_st.wsi import ArrayImage, open_image

__all__ = ["bench_her2st", "bench_spaceranger", "bench_refusals", "run_tissue_bench", "tissue_markdown"]

ST_ARRAY = (33, 35)  # legacy ST array: x 1..33, y 1..35
VISIUM_ARRAY = (78, 128)  # Visium: array_row 0..77, array_col 0..127
VISIUM_PITCH_UM = 100.0


def _affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares affine map ``dst ~ [src, 1] @ A`` (``A`` is ``[3, 2]``)."""
    design = np.column_stack([src, np.ones(len(src))])
    coef, *_ = np.linalg.lstsq(design, dst, rcond=None)
    return coef


def bench_her2st(root: str | Path, sections: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Recall of selected spots and calls on glass positions for each her2st section with an image."""
    import pandas as pd
    from scipy.spatial import cKDTree

    rows = []
    for sec in find_her2st_sections(root):
        if sec.image is None or (sections and sec.slide_id not in sections):
            continue
        spots = pd.read_csv(sec.spots, sep="\t")
        sel = spots[spots.get("selected", 1) == 1]
        arr = sel[["x", "y"]].to_numpy(np.float64)
        px = sel[["pixel_x", "pixel_y"]].to_numpy(np.float64)
        coef = _affine(arr, px)
        with open_image(sec.image) as img:
            mask = detect_tissue(img)
        recall = float(mask.contains(px).mean())
        gx, gy = np.meshgrid(np.arange(1, ST_ARRAY[0] + 1), np.arange(1, ST_ARRAY[1] + 1))
        grid = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float64)
        taken = {(int(a), int(b)) for a, b in sel[["x", "y"]].to_numpy()}
        free = np.asarray([(int(a), int(b)) not in taken for a, b in grid])
        far = cKDTree(arr).query(grid)[0] > 1.5  # more than one array step from any selected spot
        glass = grid[free & far]
        glass_px = np.column_stack([glass, np.ones(len(glass))]) @ coef
        called = mask.contains(glass_px)
        rows.append({
            "slide": sec.slide_id, "image": str(sec.image), "tissue_spots": int(len(px)), "recall": recall,
            "glass_positions": int(len(glass)), "glass_called_tissue": float(called.mean()) if len(glass) else None,
            "tissue_fraction": mask.fraction,
        })
    if not rows:
        raise InputError(root, "no her2st section with an image")
    return rows


def bench_spaceranger(outs: str | Path, image: str | Path | None = None) -> dict[str, Any]:
    """Recall of ``in_tissue`` spots, out-of-tissue calls and pseudo-spots outside the capture area."""
    outs = Path(outs)
    spatial_dir = outs / "spatial"
    pos = read_tissue_positions(spatial_dir)
    sf = read_scalefactors(spatial_dir)
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    rc = pos[["array_row", "array_col"]].to_numpy(np.float64)
    path, scale, how = resolve_image_scale(image, sf, xy, spatial_dir)
    if path is None:
        raise InputError(spatial_dir, "no usable image (hires/lowres) to detect tissue on")
    with open_image(path, scale=scale) as img:
        mask = detect_tissue(img)
        width, height = img.width, img.height
    in_t = pos["in_tissue"].astype(int).to_numpy() == 1
    called = mask.contains(xy)
    coef = _affine(rc[:, ::-1], xy)  # pixel ~ (col, row)
    rr, cc = np.meshgrid(np.arange(VISIUM_ARRAY[0]), np.arange(VISIUM_ARRAY[1]), indexing="ij")
    full = np.column_stack([rr.ravel(), cc.ravel()])
    full = full[(full[:, 0] % 2) == (full[:, 1] % 2)]  # Visium: even rows on even columns
    full_px = np.column_stack([full[:, ::-1], np.ones(len(full))]) @ coef
    pitch_px = float(np.hypot(*coef[0])) * 2.0  # one array column is half a pitch
    from matplotlib.path import Path as Polygon
    from scipy.spatial import ConvexHull

    hull = ConvexHull(full_px)
    centre = full_px.mean(0)
    verts = full_px[hull.vertices]
    verts = centre + (verts - centre) * (1 + 0.5 * pitch_px / np.linalg.norm(verts - centre, axis=1, keepdims=True))
    capture = Polygon(verts)
    ps, _ = grid_points(width, height, pitch_px, "hex")
    ps = ps[mask.contains(ps)]
    outside = ~capture.contains_points(ps)
    lo, hi = full_px.min(0), full_px.max(0)
    o = ps[outside]
    sides = {
        "left": int((o[:, 0] < lo[0]).sum()), "right": int((o[:, 0] > hi[0]).sum()),
        "top": int(((o[:, 1] < lo[1]) & (o[:, 0] >= lo[0]) & (o[:, 0] <= hi[0])).sum()),
        "bottom": int(((o[:, 1] > hi[1]) & (o[:, 0] >= lo[0]) & (o[:, 0] <= hi[0])).sum()),
    }
    return {
        "sample": outs.parent.name if outs.name == "outs" else outs.name,
        "image": str(path), "image_scale": scale, "image_scale_source": how,
        "in_tissue_spots": int(in_t.sum()), "recall": float(called[in_t].mean()) if in_t.any() else None,
        "out_of_tissue_spots": int((~in_t).sum()),
        "out_of_tissue_called_tissue": float(called[~in_t].mean()) if (~in_t).any() else None,
        "fiducial_dots_removed": int(mask.n_fiducials),
        "pseudo_spots": int(len(ps)), "pseudo_spots_outside_capture_area": int(outside.sum()),
        "share_outside_capture_area": float(outside.mean()) if len(ps) else None,
        "outside_capture_area_by_side": sides,
        "tissue_fraction": mask.fraction,
    }


def bench_refusals() -> list[dict[str, Any]]:
    """Images that are not H&E tissue: each must be refused with an `InputError`."""
    from skimage import data

    rng = np.random.default_rng(0)
    cases = {
        "uniform noise 600x600": rng.integers(0, 256, (600, 600, 3)).astype(np.uint8),
        "blank (white)": np.full((600, 600, 3), 245, np.uint8),
    }
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        cases[f"photograph: skimage.data.{name}"] = np.asarray(getattr(data, name)())[..., :3]
    out = []
    for name, arr in cases.items():
        try:
            mask = detect_tissue(ArrayImage(arr, name))
            out.append({"image": name, "refused": False, "message": f"accepted: {mask.fraction:.0%} tissue"})
        except InputError as exc:
            out.append({"image": name, "refused": True, "message": exc.problem})
    return out


def run_tissue_bench(
    *, her2st: str | Path | None = None, spaceranger: Sequence[str | Path] = (), out: str | Path | None = None
) -> dict[str, Any]:
    """All benchmarks whose data is given; written to ``out/tissue.json`` when ``out`` is set."""
    res: dict[str, Any] = {"refusals": bench_refusals()}
    if her2st is not None:
        res["her2st"] = bench_her2st(her2st)
    res["spaceranger"] = [bench_spaceranger(o) for o in spaceranger]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(res, Path(out) / "tissue.json")
    return res


def tissue_markdown(res: dict[str, Any]) -> str:
    """The benchmark as Markdown tables."""
    lines = []
    if res.get("her2st"):
        lines += ["| her2st section | tissue spots | recall | glass positions | glass called tissue |",
                  "|---|---|---|---|---|"]
        for r in res["her2st"]:
            g = r["glass_called_tissue"]
            lines.append(f"| {r['slide']} | {r['tissue_spots']} | {r['recall']:.3f} | {r['glass_positions']} | "
                         f"{'n/a' if g is None else f'{g:.3f}'} |")
        lines.append("")
    if res.get("spaceranger"):
        lines += ["| Space Ranger sample | image | in_tissue spots | recall | out-of-tissue spots called tissue | "
                  "fiducial dots removed | pseudo-spots | outside capture area (left/right/top/bottom) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["spaceranger"]:
            o = r["out_of_tissue_called_tissue"]
            lines.append(
                f"| {r['sample']} | {Path(r['image']).name} (scale {r['image_scale']:g}) | {r['in_tissue_spots']} | "
                f"{r['recall']:.3f} | {'n/a (none listed)' if o is None else f'{o:.3f}'} | {r['fiducial_dots_removed']} | "
                f"{r['pseudo_spots']} | {r['pseudo_spots_outside_capture_area']} ({r['share_outside_capture_area']:.1%}; "
                f"{'/'.join(str(r['outside_capture_area_by_side'][k]) for k in ('left', 'right', 'top', 'bottom'))}) |"
            )
        lines.append("")
    lines += ["| image without tissue | refused | message |", "|---|---|---|"]
    for r in res["refusals"]:
        lines.append(f"| {r['image']} | {'yes' if r['refused'] else '**no**'} | {r['message']} |")
    return "\n".join(lines) + "\n"
