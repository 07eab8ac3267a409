"""Tissue-detection benchmark (``hist-st bench tissue``) against labels that exist independently of the
detector: her2st's selected spots and glass positions, Space Ranger's ``in_tissue`` spots and the Visium
capture area (the full 78 x 128 array, placed by an affine fit of pixel on array coordinates, plus half a
pitch) around pseudo-spots laid over the mask, and images without tissue that must be refused (definitions
and results: docs/results/visium.md, section 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.path import Path as Polygon
from scipy.spatial import ConvexHull, cKDTree

from hist_st.bench import markdown_table
from hist_st.errors import InputError
from hist_st.io.legacy_st import find_her2st_sections
from hist_st.io.spaceranger import read_scalefactors, read_tissue_positions, resolve_image_scale
from hist_st.jsonio import write_json
from hist_st.tissue import detect_tissue, grid_points
from hist_st.wsi import ArrayImage, open_image

__all__ = ["bench_her2st", "bench_spaceranger", "bench_refusals", "run_tissue_bench", "tissue_markdown"]

ST_ARRAY = (33, 35)  # legacy ST array: x 1..33, y 1..35
VISIUM_ARRAY = (78, 128)  # Visium: array_row 0..77, array_col 0..127


def _affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares affine map ``dst ~ [src, 1] @ A`` (``A`` is ``[3, 2]``)."""
    return np.linalg.lstsq(np.column_stack([src, np.ones(len(src))]), dst, rcond=None)[0]


def bench_her2st(root: str | Path, sections: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Recall of selected spots and calls on glass positions for each her2st section with an image."""
    rows = []
    for sec in find_her2st_sections(root):
        if sec.image is None or (sections and sec.slide_id not in sections):
            continue
        spots = pd.read_csv(sec.spots, sep="\t")
        sel = spots[spots.get("selected", 1) == 1]
        arr, px = sel[["x", "y"]].to_numpy(np.float64), sel[["pixel_x", "pixel_y"]].to_numpy(np.float64)
        mask = detect_tissue(sec.image)
        grid = np.argwhere(np.ones(ST_ARRAY, bool)) + 1.0  # array positions (x, y)
        glass = grid[cKDTree(arr).query(grid)[0] > 1.5]  # more than one array step from any selected spot
        called = mask.contains(np.column_stack([glass, np.ones(len(glass))]) @ _affine(arr, px))
        rows.append({
            "slide": sec.slide_id, "image": str(sec.image), "tissue_spots": int(len(px)),
            "recall": float(mask.contains(px).mean()),
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
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    rc = pos[["array_row", "array_col"]].to_numpy(np.float64)
    path, scale, how = resolve_image_scale(image, read_scalefactors(spatial_dir), xy, spatial_dir)
    if path is None:
        raise InputError(spatial_dir, "no usable image (hires/lowres) to detect tissue on")
    with open_image(path, scale=scale) as img:
        mask = detect_tissue(img)
        width, height = img.width, img.height
    in_t = pos["in_tissue"].astype(int).to_numpy() == 1
    called = mask.contains(xy)
    coef = _affine(rc[:, ::-1], xy)  # pixel ~ (col, row)
    full = np.argwhere(np.indices(VISIUM_ARRAY).sum(0) % 2 == 0)  # (row, col): even rows on even columns
    full_px = np.column_stack([full[:, ::-1], np.ones(len(full))]) @ coef
    pitch_px = float(np.hypot(*coef[0])) * 2.0  # one array column is half a pitch
    centre = full_px.mean(0)
    hull = full_px[ConvexHull(full_px).vertices] - centre  # the full array's hull, half a pitch wider
    capture = Polygon(centre + hull * (1 + 0.5 * pitch_px / np.linalg.norm(hull, axis=1, keepdims=True)))
    ps, _ = grid_points(width, height, pitch_px, "hex")
    ps = ps[mask.contains(ps)]
    outside = ~capture.contains_points(ps)
    lo, hi = full_px.min(0), full_px.max(0)
    o = ps[outside]
    x_in = (o[:, 0] >= lo[0]) & (o[:, 0] <= hi[0])
    sides = {"left": int((o[:, 0] < lo[0]).sum()), "right": int((o[:, 0] > hi[0]).sum()),
             "top": int((x_in & (o[:, 1] < lo[1])).sum()), "bottom": int((x_in & (o[:, 1] > hi[1])).sum())}
    return {
        "sample": outs.parent.name if outs.name == "outs" else outs.name,
        "image": str(path), "image_scale": scale, "image_scale_source": how,
        "in_tissue_spots": int(in_t.sum()), "recall": float(called[in_t].mean()) if in_t.any() else None,
        "out_of_tissue_spots": int((~in_t).sum()),
        "out_of_tissue_called_tissue": float(called[~in_t].mean()) if (~in_t).any() else None,
        "fiducial_dots_removed": int(mask.n_fiducials),
        "pseudo_spots": int(len(ps)), "pseudo_spots_outside_capture_area": int(outside.sum()),
        "share_outside_capture_area": float(outside.mean()) if len(ps) else None,
        "outside_capture_area_by_side": sides, "tissue_fraction": mask.fraction,
    }


def bench_refusals() -> list[dict[str, Any]]:
    """Images that are not H&E tissue: each must be refused with an `InputError`."""
    from skimage import data

    rng = np.random.default_rng(0)
    cases = {"uniform noise 600x600": rng.integers(0, 256, (600, 600, 3)).astype(np.uint8),
             "blank (white)": np.full((600, 600, 3), 245, np.uint8)}
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
        write_json(res, Path(out) / "tissue.json")
    return res


def tissue_markdown(res: dict[str, Any]) -> str:
    """The benchmark as Markdown tables."""
    lines = []
    if res.get("her2st"):
        head = ["her2st section", "tissue spots", "recall", "glass positions", "glass called tissue"]
        rows = [[r["slide"], r["tissue_spots"], f"{r['recall']:.3f}", r["glass_positions"],
                 _share(r["glass_called_tissue"], "n/a")] for r in res["her2st"]]
        lines += [*markdown_table(head, rows), ""]
    if res.get("spaceranger"):
        head = ["Space Ranger sample", "image", "in_tissue spots", "recall",
                "out-of-tissue spots called tissue", "fiducial dots removed", "pseudo-spots",
                "outside capture area (left/right/top/bottom)"]
        rows = [[r["sample"], f"{Path(r['image']).name} (scale {r['image_scale']:g})", r["in_tissue_spots"],
                 f"{r['recall']:.3f}", _share(r["out_of_tissue_called_tissue"], "n/a (none listed)"),
                 r["fiducial_dots_removed"], r["pseudo_spots"],
                 f"{r['pseudo_spots_outside_capture_area']} ({r['share_outside_capture_area']:.1%}; "
                 + "/".join(map(str, r["outside_capture_area_by_side"].values())) + ")"]
                for r in res["spaceranger"]]
        lines += [*markdown_table(head, rows), ""]
    rows = [[r["image"], "yes" if r["refused"] else "**no**", r["message"]] for r in res["refusals"]]
    return "\n".join([*lines, *markdown_table(["image without tissue", "refused", "message"], rows)]) + "\n"


def _share(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:.3f}"
