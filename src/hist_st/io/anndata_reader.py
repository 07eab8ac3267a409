"""Any AnnData ``.h5ad`` with ``obsm['spatial']`` (x, y full-resolution pixels) plus an H&E image.

The image is the user's (full resolution, or a hires/lowres copy through the scale factors in
``uns['spatial']``), else the ``hires`` (unless blank) or ``lowres`` image that ``scanpy.read_visium`` stored
in ``uns['spatial'][library]['images']``, read through its ``tissue_<key>_scalef``. obs/var columns, the
library id, the scale factors and the stored images are kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.harmonise import harmonise_slide
from hist_st.io._util import (
    TECHNOLOGY_PITCH_UM,
    VISIUM_SCALEFACTOR_SPOT_UM,
    check_counts,
    derive_hex_um_per_px,
    derive_um_per_px,
    normalise_technology,
)
from hist_st.io.spaceranger import is_blank, resolve_image_scale
from hist_st.slide import DEFAULT_LATTICE_UNIT_UM, Slide
from hist_st.wsi import H5AD_IMAGE_SEP, as_rgb_uint8

__all__ = ["read_anndata", "anndata_to_raw_slide"]


def _counts_matrix(adata, source) -> tuple[sp.csr_matrix, str]:
    if "counts" in adata.layers:
        return check_counts(adata.layers["counts"], source), "layers['counts']"
    if adata.raw is not None and adata.raw.shape == adata.shape:
        try:
            return check_counts(adata.raw.X, source), "raw.X"
        except InputError:
            pass
    if adata.X is None:
        raise InputError(source, "the AnnData has no X and no layers['counts']")
    return check_counts(adata.X, source), "X"


def anndata_to_raw_slide(
    adata,
    source: str | Path,
    image: str | Path | None = None,
    *,
    slide_id: str | None = None,
    patient: str | None = None,
    um_per_px: float | None = None,
    spot_pitch_um: float | None = None,
    technology: str | None = None,
    symbol_column: str | None = None,
    image_scale: float | None = None,
) -> Slide:
    """Build a `Slide` from an in-memory AnnData of raw counts (see `read_anndata`)."""

    image_scale_given = image_scale
    if "spatial" not in adata.obsm:
        raise InputError(source, "obsm['spatial'] (spot x, y in full-resolution pixels) is missing")
    spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    counts, where = _counts_matrix(adata, source)
    obs = adata.obs
    src_path = Path(str(source))
    tech = normalise_technology(technology or adata.uns.get("hist_st", {}).get("technology"))
    array = None
    if "array_row" in obs and "array_col" in obs:
        array = np.column_stack([obs["array_row"].to_numpy(), obs["array_col"].to_numpy()]).astype(np.int64)
    meta: dict = {"source": str(source), "counts_from": where}
    sf: dict = {}
    images: dict = {}
    library_id = None
    lib = adata.uns.get("spatial", {})
    if isinstance(lib, dict) and lib:
        library_id, first = next(iter(lib.items()))
        if isinstance(first, dict):
            sf = {k: float(v) for k, v in dict(first.get("scalefactors", {})).items() if _is_number(v)}
            images = {str(k): np.asarray(v) for k, v in dict(first.get("images", {})).items()}
    if tech == "unknown" and array is not None and sf.get("spot_diameter_fullres"):
        tech = "visium"
    pitch = spot_pitch_um or TECHNOLOGY_PITCH_UM.get(tech)
    if um_per_px is not None:
        meta["um_per_px_source"] = "given by the user"
    elif array is not None and pitch and tech == "visium":
        um_per_px, meta["um_per_px_source"] = derive_hex_um_per_px(array, spatial, pitch, source)
    elif array is not None and pitch and tech == "st":
        um_per_px, meta["um_per_px_source"] = derive_um_per_px(array[:, ::-1], spatial, pitch, source)
    elif sf.get("spot_diameter_fullres") and tech == "visium":
        um_per_px = VISIUM_SCALEFACTOR_SPOT_UM / float(sf["spot_diameter_fullres"])
        meta["um_per_px_source"] = "from uns['spatial'] spot_diameter_fullres (65 um)"
    # else: left None; `hist-st prepare` takes it from the image file or fails with a clear message
    image_scale = None
    if image is not None:
        image, image_scale, meta["image_scale_source"] = resolve_image_scale(
            image, sf, spatial, None, image_scale_given)
    elif images and src_path.suffix == ".h5ad" and src_path.is_file():
        for key in ("hires", "lowres"):
            scalef = sf.get(f"tissue_{key}_scalef")
            if key in images and scalef and not is_blank(images[key]):
                image = f"{src_path}{H5AD_IMAGE_SEP}uns/spatial/{library_id}/images/{key}"
                image_scale = float(scalef)
                meta["image_scale_source"] = f"uns['spatial'][{library_id!r}]['images'][{key!r}] at tissue_{key}_scalef = {scalef:g}"
                break
    symbols = None
    for col in ([symbol_column] if symbol_column else []) + [
        "gene_symbols",
        "gene_name",
        "symbol",
        "feature_name",
    ]:
        if col and col in adata.var.columns:
            symbols = adata.var[col].astype(str).to_numpy()
            break
    obs_keep = obs.drop(columns=[c for c in ("patch_outside",) if c in obs.columns])
    slide = Slide(
        slide_id=slide_id or Path(str(source)).stem,
        spatial=spatial,
        barcodes=np.asarray(adata.obs_names, dtype=object),
        genes=np.asarray(adata.var_names, dtype=object),
        counts=counts,
        array_coords=array,
        um_per_px=float(um_per_px) if um_per_px is not None else None,
        spot_pitch_um=pitch,
        lattice_unit_um=DEFAULT_LATTICE_UNIT_UM.get(tech, pitch),
        technology=tech,
        patient=patient,
        image=str(image) if image else None,
        image_scale=image_scale if image else None,
        meta=meta,
        obs=obs_keep.copy() if len(obs_keep.columns) else None,
        var=adata.var.copy() if len(adata.var.columns) else None,
        library_id=str(library_id) if library_id is not None else None,
        spatial_images={k: as_rgb_uint8(v) for k, v in images.items() if k in ("hires", "lowres")},
        scalefactors=sf,
    )
    return harmonise_slide(slide, symbols=symbols)


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def read_anndata(
    path: str | Path,
    image: str | Path | None = None,
    *,
    slide_id: str | None = None,
    patient: str | None = None,
    um_per_px: float | None = None,
    spot_pitch_um: float | None = None,
    technology: str | None = None,
    symbol_column: str | None = None,
    image_scale: float | None = None,
) -> Slide:
    """Read an AnnData ``.h5ad`` of raw counts with ``obsm['spatial']`` plus its image.

    Counts come from ``layers['counts']``, else ``raw.X``, else ``X`` (must be non-negative integers).
    um/px: ``um_per_px``, else derived from ``obs['array_row'/'array_col']`` spacing (Visium / ST), else
    ``uns['spatial'][lib]['scalefactors']['spot_diameter_fullres']``, else the image file's resolution.

    Raises:
        InputError: unreadable file, no ``obsm['spatial']``, non-integer or negative counts.
    """
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "AnnData file not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise InputError(path, f"cannot read as an AnnData .h5ad ({type(exc).__name__}: {exc})") from exc
    return anndata_to_raw_slide(
        adata,
        path,
        image,
        slide_id=slide_id,
        patient=patient,
        um_per_px=um_per_px,
        spot_pitch_um=spot_pitch_um,
        technology=technology,
        symbol_column=symbol_column,
        image_scale=image_scale,
    )
