"""Preprocessing on AnnData, scanpy style: patch embeddings and lattice sites of the spots of ``adata``.

Thin functions over the pipeline's own steps (`hist_st.embed.embed_slide`, `hist_st.wsi`,
`hist_st.io._util.attach_lattice`), so they give the numbers ``hist-st prepare`` writes. ``adata`` needs
``obsm['spatial']``: spot centres (x, y) in full-resolution image pixels, as ``scanpy.read_visium`` and
hist-st's prepared slides store them. Microns per pixel come from ``um_per_px=``, else from a prepared
slide's ``uns['hist_st']``, else (`embed`) from the image file. Each function annotates ``adata`` in place
(``copy=False``) or returns an annotated copy (``copy=True``), and records its parameters in
``uns[key_added]``.

```python
import anndata as ad
import hist_st as hs
adata = ad.read_h5ad("visium.h5ad")
hs.pp.embed(adata, "he.tif", um_per_px=0.2125)       # obsm['X_hist_embedding'] float32 [N, 1280]
hs.pp.lattice(adata, um_per_px=0.2125)               # obsm['lattice'] int64 [N, 2]
```
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.embed import embed_slide
from hist_st.encoders import get_encoder
from hist_st.errors import InputError
from hist_st.io._util import (
    VISIUM_PITCH_UM,
    attach_lattice,
    derive_hex_um_per_px,
    fill_pitch,
    normalise_technology,
)
from hist_st.io.spaceranger import resolve_image_scale, um_per_px_from_scalefactors
from hist_st.slide import Slide, anndata_to_slide
from hist_st.stain import macenko_normaliser
from hist_st.wsi import PatchParams, open_slide_image

__all__ = ["embed", "lattice", "spots_of"]


def _scalefactors(adata: Any) -> dict[str, float]:
    """10x's scale factors of the one library in ``uns['spatial']`` (as `scanpy.read_visium` keeps them),
    or {}."""
    libraries = [v for v in dict(adata.uns.get("spatial") or {}).values() if isinstance(v, dict)]
    return dict(libraries[0].get("scalefactors") or {}) if len(libraries) == 1 else {}


def _visium_um_per_px(adata: Any) -> float | None:
    """um/px of a Visium AnnData as `hist-st prepare` reads a Space Ranger folder: from the spot spacing on
    the array (``obs['array_row', 'array_col']``, 100 um pitch), else from ``spot_diameter_fullres``."""
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        rc = adata.obs[["array_row", "array_col"]].to_numpy(np.int64)
        try:
            xy = np.asarray(adata.obsm["spatial"], np.float64)
            return derive_hex_um_per_px(rc, xy, VISIUM_PITCH_UM, "adata")[0]
        except InputError:  # too few spots on the array
            pass
    return um_per_px_from_scalefactors(_scalefactors(adata))


def spots_of(adata: Any, *, um_per_px: float | None = None, need_um: bool = False) -> Slide:
    """The spots of ``adata`` as a `Slide` without counts or embeddings (coordinates and metadata only).

    Args:
        adata: An AnnData with ``obsm['spatial']`` ``[N, 2]`` (x, y) full-resolution pixels; a hist-st
            prepared slide also brings its ``uns['hist_st']`` record (um/px, pitch, measured grid).
        um_per_px: Microns per full-resolution pixel (overrides the recorded value; default: the prepared
            slide's, else the one an earlier `embed` or `lattice` recorded in ``uns[...]['params']``, else
            for a Visium AnnData of `scanpy.read_visium` what `hist-st prepare` derives
            (`_visium_um_per_px`).
        need_um: Refuse when no um per pixel is given or recorded (`lattice`, `hist_st.tl.predict`).

    Returns:
        A `Slide` with ``spatial``, ``barcodes`` and what ``uns['hist_st']`` records.

    Raises:
        InputError: No ``obsm['spatial']``, ``um_per_px`` not a positive number, or none known with
            ``need_um``.
    """
    import anndata as ad

    if "spatial" not in adata.obsm:
        raise InputError("adata", "obsm['spatial'] (spot x, y in full-resolution pixels) is missing")
    light = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"spatial": np.asarray(adata.obsm["spatial"])},
                       uns={"hist_st": dict(adata.uns.get("hist_st", {}))})
    slide = anndata_to_slide(light, "adata")
    if um_per_px is None and slide.um_per_px is None:  # what an earlier pp.embed / pp.lattice was told
        recorded = {float(v["params"]["um_per_px"]) for v in adata.uns.values()
                    if isinstance(v, dict) and isinstance(v.get("params"), dict) and "um_per_px" in v["params"]}
        if len(recorded) == 1:
            um_per_px = recorded.pop()
    if um_per_px is None and slide.um_per_px is None and _scalefactors(adata):  # scanpy's read_visium
        um_per_px = _visium_um_per_px(adata)
    if um_per_px is not None:
        if not (np.isfinite(um_per_px) and um_per_px > 0):
            raise InputError("um_per_px", f"must be a positive number, got {um_per_px}")
        slide.um_per_px = float(um_per_px)
    if need_um and slide.um_per_px is None:
        raise InputError("um_per_px",
                         "not recorded in the AnnData; give um_per_px= (microns per full-resolution px)")
    return slide


def embed(
    adata: Any,
    image: str | Path,
    *,
    encoder: str = "efficientnet-lite0",
    weights: str | Path | None = None,
    device: str | None = None,
    um_per_px: float | None = None,
    image_scale: float | None = None,
    patch_px: int = 224,
    patch_um_per_px: float = 0.5,
    batch_size: int = 32,
    precision: str = "fp32",
    stain_norm: str | None = None,
    key_added: str = "X_hist_embedding",
    progress: bool = False,
    copy: bool = False,
) -> Any | None:
    """Patch embeddings of the spots of ``adata`` from an H&E image (what ``hist-st prepare`` computes).

    A square patch of ``patch_px`` pixels at ``patch_um_per_px`` is cut around every spot centre, resampled
    from the image's own resolution, and encoded; a patch reaching outside the image is padded with white.

    Args:
        adata: AnnData with ``obsm['spatial']`` (full-resolution pixels).
        image: The H&E image (TIFF/OME-TIFF/SVS/PNG/..., or ``"file.h5ad#uns/spatial/<lib>/images/<key>"``).
        encoder: Encoder registry name (`hist_st.encoders.get_encoder`); ``weights`` its weights file.
        device: ``cpu``, ``cuda``, ... (default: cuda when available).
        um_per_px: Microns per full-resolution pixel (default: recorded in ``adata`` or in the image).
        image_scale: Image pixels per full-resolution pixel when ``image`` is a downscaled copy (Visium
            hires: ``tissue_hires_scalef``; default: found from ``uns['spatial']``'s scale factors and the
            image's size, as `hist-st prepare` does, else 1).
        patch_px, patch_um_per_px: Patch geometry (default 224 px at 0.5 um/px = 112 um).
        batch_size: Patches per encoder call.
        precision: ``fp32`` or ``bf16``.
        stain_norm: None or ``"macenko"`` (default reference).
        key_added: Where the embeddings go.
        progress: Show a progress bar.
        copy: Return an annotated copy instead of annotating ``adata``.

    Returns:
        None, or the copy with ``copy=True``. Writes ``obsm[key_added]`` (float32 ``[N, C]``),
        ``obs[key_added + '_outside']`` (bool: the patch was padded) and ``uns[key_added]['params']``
        (encoder, weights id, image, um/px, patch geometry, precision, stain normalisation, real image
        resolution). Warns when patches are enlarged more than 2x from the image's pixels.

    Raises:
        InputError: Bad options, an unreadable image, no um per pixel known, spot centres outside the image.
    """
    adata = adata.copy() if copy else adata
    if stain_norm not in (None, "macenko"):
        raise InputError("stain_norm", f"unknown method {stain_norm!r}; use None or 'macenko'")
    for name, value in (("patch_px", patch_px), ("patch_um_per_px", patch_um_per_px), ("batch_size", batch_size)):
        if not (np.isfinite(value) and value > 0):
            raise InputError(name, f"must be a positive number, got {value}")
    slide = spots_of(adata, um_per_px=um_per_px)
    params = PatchParams(patch_px, patch_um_per_px)
    if image_scale is None and (sf := _scalefactors(adata)):  # a hires/lowres image: its 10x scale factor
        image_scale = resolve_image_scale(image, sf, slide.spatial, None)[1]
    slide.image, slide.image_scale = str(image), image_scale
    found: list[str] = []  # image checks first (as `hist-st prepare`): they are cheaper than the encoder
    with open_slide_image(slide, params, found, thumbnail_size=None, um_hint="give um_per_px=") as img:
        for warning in found:
            warnings.warn(warning, UserWarning, stacklevel=2)
        enc = get_encoder(encoder, weights, device).with_precision(precision)
        transform = macenko_normaliser() if stain_norm == "macenko" else None
        emb, outside = embed_slide(slide, img, enc, params, batch_size=batch_size, transform=transform,
                                   progress=progress)
    adata.obsm[key_added] = emb
    adata.obs[f"{key_added}_outside"] = outside
    adata.uns[key_added] = {"params": {
        "encoder": enc.name, "encoder_weights": str(enc.weights_id or ""), "image": slide.image,
        "image_scale": float(image_scale or 1.0),
        "um_per_px": float(slide.um_per_px), "patch_px": params.size_px, "patch_um_per_px": params.um_per_px,
        "precision": precision,
        "stain_norm": stain_norm or "none", "source_um_per_px": slide.meta["source_um_per_px"],
        "patch_upsampling": slide.meta["patch_upsampling"]}}
    return adata if copy else None


def lattice(
    adata: Any,
    *,
    um_per_px: float | None = None,
    pitch_um: float | None = None,
    unit_um: float | None = None,
    technology: str | None = None,
    key_added: str = "lattice",
    copy: bool = False,
) -> Any | None:
    """Integer lattice sites of the spots: the measured spot grid, one site per pitch (as ``hist-st prepare``).

    The grid (pitch, hex or square, rotation) is measured from the spot centres
    (`hist_st.lattice.geometry.measure_grid`) and every spot gets a unique site, neighbours one site apart
    (`hist_st.io._util.attach_lattice`).

    Args:
        adata: AnnData with ``obsm['spatial']`` (full-resolution pixels).
        um_per_px: Microns per full-resolution pixel (default: recorded in ``adata``).
        pitch_um: The declared spot pitch (um), checked against the measured one (a warning when they
            disagree); default: recorded in ``adata``, else the median nearest-neighbour distance.
        unit_um: A lattice unit (um) to keep instead of the measured pitch, e.g. a model's training unit.
        technology: ``visium``, ``st``, ... (its grid type is checked; default: recorded, else unknown).
        key_added: Where the sites go.
        copy: Return an annotated copy instead of annotating ``adata``.

    Returns:
        None, or the copy with ``copy=True``. Writes ``obsm[key_added]`` (int64 ``[N, 2]``, unique, min 0)
        and ``uns[key_added]`` (``params``; the ``lattice_unit_um`` and ``spot_pitch_um`` used; ``grid``:
        the measured geometry; ``neighbour_adjacency``: share of neighbour pairs one site apart).

    Raises:
        InputError: No um per pixel known, fewer than two spots, or non-positive options.
    """
    adata = adata.copy() if copy else adata
    slide = spots_of(adata, um_per_px=um_per_px, need_um=True)
    for name, value in (("pitch_um", pitch_um), ("unit_um", unit_um)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InputError(name, f"must be a positive number, got {value}")
    if technology is not None:
        slide.technology = normalise_technology(technology)
    if pitch_um is not None:
        slide.spot_pitch_um = float(pitch_um)
    if unit_um is not None:
        slide.lattice_unit_um = float(unit_um)
    fill_pitch(slide)
    attach_lattice(slide)
    adata.obsm[key_added] = np.asarray(slide.lattice, dtype=np.int64)
    grid = {k: v for k, v in (slide.meta.get("spot_grid") or {}).items() if v is not None}
    adata.uns[key_added] = {
        "params": {k: v for k, v in {"um_per_px": slide.um_per_px, "pitch_um": pitch_um, "unit_um": unit_um,
                                     "technology": technology}.items() if v is not None},
        "lattice_unit_um": float(slide.lattice_unit_um),
        "spot_pitch_um": float(slide.spot_pitch_um),
        "grid": grid,
        "neighbour_adjacency": float((slide.meta.get("neighbour_adjacency") or {}).get("share", np.nan)),
    }
    return adata if copy else None
