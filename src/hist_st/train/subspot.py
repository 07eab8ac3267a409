"""Sub-spot tokens: patches on a grid finer than the spots, supervised by the spot that contains them.

A legacy-ST spot's cell (the square of side ``pitch`` around its centre) is split into ``f x f`` sub-cells;
each sub-cell centre gets its own patch embedding and becomes one token, and the spot's measured counts
supervise the sum of its ``f^2`` tokens (`hist_st.train.coarse`, ``supervise=coarse<f>``). A model trained
this way predicts at ``pitch / f``: below the resolution of the measurement itself.

```python
from hist_st.train.subspot import subspot_slide
fine = subspot_slide(slide, 2)          # 4 tokens per spot, 100 um apart on a 200 um ST grid
train(load_config(None, ["supervise=coarse2"]), [fine, ...])
```

The sub-spot slide stores each spot's counts split equally over its sub-spots (``counts / f^2``) so that the
sum over a spot's sub-spots is the measured spot; those split counts are not measurements of the sub-spots
and only make sense with ``supervise=coarse<f>``, which groups tokens by ``obs['parent']``
(``meta['subspot']`` says so).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hist_st.embed import embed_he_slide
from hist_st.errors import InputError
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.lattice.geometry import GridGeometry, measure_grid
from hist_st.slide import Slide

__all__ = ["subspot_offsets", "subspot_slide", "subspot_groups", "subspot_grid", "set_subspot_grid"]


def subspot_offsets(factor: int, pitch: float, angle_deg: float) -> np.ndarray:
    """Centres of the ``factor x factor`` sub-cells of a square cell of side ``pitch``, relative to its centre.

    Returns:
        float64 ``[factor^2, 2]`` (x, y), rotated by ``angle_deg`` (the grid's direction in the image).
    """
    steps = ((np.arange(factor) + 0.5) / factor - 0.5) * pitch
    grid = np.stack(np.meshgrid(steps, steps, indexing="xy"), -1).reshape(-1, 2)
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return grid @ rot.T


def subspot_grid(parent: Any, factor: int) -> Any:
    """The sub-spot grid of a measured square spot grid: pitch / factor, phase chosen so that the sub-cells
    of the spot at site ``(n, m)`` land on sites ``factor * (n, m) + (i, j)``, ``0 <= i, j < factor``.

    Measuring the sub-spots' own grid instead would not work: the gaps between neighbouring spots' sub-spots
    vary with the spots' placement noise, so the measured pitch drifts and sites collide.
    """

    shift = 0.5 - factor / 2.0
    phase = tuple(float((factor * p + shift) % 1.0) for p in parent.phase)
    return GridGeometry(pitch_um=parent.pitch_um / factor, kind="square", angle_deg=parent.angle_deg,
                        row_spacing_um=parent.row_spacing_um / factor, phase=phase, order=parent.order,
                        n_spots=parent.n_spots * factor**2, n_steps=parent.n_steps)


def set_subspot_grid(sub: Slide, parent_slide: Slide) -> Slide:
    """Give a sub-spot slide the grid derived from its parent slide's measured grid (`subspot_grid`), in place."""

    factor = int(sub.meta["subspot"]["factor"])
    geom = subspot_grid(measure_grid(parent_slide.spatial, parent_slide.um_per_px, source=f"slide {parent_slide.slide_id!r}"),
                        factor)
    sub.meta["spot_grid"] = geom.as_dict()
    sub.spot_pitch_um = sub.lattice_unit_um = geom.pitch_um
    sub.lattice = np.asarray(to_lattice(continuous_coords(sub), source=f"slide {sub.slide_id!r}"), dtype=np.int64)
    return sub


def subspot_groups(slide: Slide, factor: int) -> np.ndarray | None:
    """The parent spot of each token of a sub-spot slide (``obs['parent']``), or None for other slides.

    Raises:
        InputError: A sub-spot slide made with another factor than the requested supervision.
    """
    rec = slide.meta.get("subspot") if isinstance(slide.meta, dict) else None
    if not rec:
        return None
    if int(rec["factor"]) != factor:
        raise InputError(f"slide {slide.slide_id!r}", f"has {rec['factor']}x{rec['factor']} sub-spots per spot; "
                         f"train it with supervise=coarse{rec['factor']}, not coarse{factor}")
    return np.asarray(slide.obs["parent"], dtype=np.int64)


def subspot_slide(
    slide: Slide, factor: int = 2, *, encoder: str | None = None, weights: Any = None, device: str = "cpu",
    progress: bool = False,
) -> Slide:
    """Tokens at ``pitch / factor`` inside each spot's cell, embedded from the slide's image.

    Args:
        slide: A prepared slide on a square spot grid with its image and counts.
        factor: Sub-cells per side (2: four tokens per spot, half the pitch apart).
        encoder: Patch encoder (default: the one the slide was prepared with, ``meta['encoder']``).
        weights, device, progress: As `hist_st.embed.embed_he_slide`.

    Returns:
        A `Slide` with ``N * factor^2`` spots: sub-cell centres, their embeddings (same patch geometry as the
        slide's), ``counts`` = the parent's counts / ``factor^2``, ``obs['parent']`` (row of the parent spot),
        ``meta['subspot']`` = ``{"factor", "parent_pitch_um"}``, spot pitch and lattice unit ``pitch / factor``.

    Raises:
        InputError: factor < 2, no image, no counts, or a grid that is not square.
    """

    src = f"slide {slide.slide_id!r}"
    if factor < 2:
        raise InputError("factor", f"must be >= 2 sub-cells per side, got {factor}")
    if not slide.image or slide.um_per_px is None:
        raise InputError(src, "needs its H&E image and um per pixel to embed sub-spot patches")
    if slide.counts is None:
        raise InputError(src, "has no counts to supervise sub-spots with")
    geom = measure_grid(slide.spatial, slide.um_per_px, source=src)
    if geom.kind != "square":
        raise InputError(src, f"sub-spot cells need a square spot grid (legacy ST); this one is {geom.kind}")
    pitch_px = geom.pitch_um / slide.um_per_px
    off = subspot_offsets(factor, pitch_px, geom.angle_deg)  # [f^2, 2]
    k = len(off)
    n = slide.n_spots
    parent = np.repeat(np.arange(n), k)
    spatial = np.asarray(slide.spatial, dtype=np.float64)[parent] + np.tile(off, (n, 1))
    counts = sp.csr_matrix(slide.counts)[parent].astype(np.float32) / float(k)
    patch = slide.meta.get("patch") or {"size_px": 224, "um_per_px": 0.5}
    enc = encoder or slide.meta.get("encoder") or next(iter(slide.embeddings), "efficientnet-lite0")
    meta = {key: v for key, v in slide.meta.items() if key not in ("spot_grid", "grid_check", "neighbour_adjacency",
                                                                   "prepare_key")}
    meta["subspot"] = {"factor": factor, "parent_pitch_um": geom.pitch_um,
                       "counts": "parent spot counts / factor^2 (not measured per sub-spot)"}
    barcodes = np.array([f"{b}_{i}" for b in np.asarray(slide.barcodes) for i in range(k)], dtype=object)
    sub = slide.on_spots(
        spatial,
        barcodes,
        genes=np.asarray(slide.genes, dtype=object),
        counts=counts,
        spot_pitch_um=geom.pitch_um / factor,
        lattice_unit_um=geom.pitch_um / factor,
        meta=meta,
        obs=pd.DataFrame({"parent": parent}, index=barcodes),
    )
    embed_he_slide(sub, encoder=enc, weights=weights, device=device, patch_px=int(patch["size_px"]),
                   patch_um_per_px=float(patch["um_per_px"]), stain_norm=slide.meta.get("stain_norm"),
                   progress=progress)
    return set_subspot_grid(sub, slide)
