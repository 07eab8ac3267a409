"""10x Genomics Space Ranger ``outs/`` folders (Visium).

Reads the filtered matrix (``filtered_feature_bc_matrix.h5``, HDF5 v3 or v2, or the MEX triplet
``filtered_feature_bc_matrix/{matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz|genes.tsv}``), the spot
positions (``spatial/tissue_positions.csv`` with header, Space Ranger >= 2.0, or
``spatial/tissue_positions_list.csv`` without), ``spatial/scalefactors_json.json`` and the images in
``spatial/``. The H&E image behind the patches is the full-resolution image when the user has it, else
(as in most deposited data) ``tissue_hires_image.png`` or ``tissue_lowres_image.png`` through its 10x scale
factor (`resolve_image_scale`). What ``scanpy.read_visium`` keeps is kept: obs ``in_tissue``,
``array_row``, ``array_col``; var ``gene_ids``, ``feature_types``, ``genome``; the library id; the 10x
scale factors and the original hires/lowres images.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.harmonise import harmonise_slide
from hist_st.io._util import (
    VISIUM_PITCH_UM,
    VISIUM_SCALEFACTOR_SPOT_UM,
    VISIUM_SPOT_UM,
    check_counts,
    derive_hex_um_per_px,
)
from hist_st.slide import Slide
from hist_st.wsi import PillowImage, image_size

__all__ = [
    "read_spaceranger",
    "read_10x_h5",
    "read_10x_mex",
    "read_tissue_positions",
    "read_scalefactors",
    "um_per_px_from_scalefactors",
    "resolve_image_scale",
    "spatial_images",
    "POSITION_COLUMNS",
]

POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


def _s(a) -> np.ndarray:
    return np.asarray(
        [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).reshape(-1)], dtype=object
    )


def _features(ids, names, ftype=None, genome=None) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame(
        {
            "gene_ids": np.asarray(ids, dtype=object),
            "gene_symbols": np.asarray(names, dtype=object),
            "feature_types": np.asarray(ftype if ftype is not None else ["Gene Expression"] * n, dtype=object),
            "genome": np.asarray(genome if genome is not None else [""] * n, dtype=object),
        }
    )


def read_10x_h5(path: str | Path) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame, str | None]:
    """Read a 10x HDF5 feature-barcode matrix (v3 ``matrix/`` or v2 ``<genome>/`` layout).

    Returns:
        ``(counts CSR [N, G], barcodes [N], features, library_id)``: gene-expression features only;
        ``features`` has one row per gene with ``gene_ids``, ``gene_symbols``, ``feature_types``, ``genome``;
        ``library_id`` is the file's ``library_ids`` attribute (None when absent).
    """
    import h5py

    path = Path(path)
    library_id = None
    try:
        with h5py.File(path, "r") as f:
            libs = f.attrs.get("library_ids")
            if libs is not None and len(np.atleast_1d(libs)):
                library_id = str(_s(np.atleast_1d(libs))[0])
            if "matrix" in f:
                g = f["matrix"]
                feats = g["features"]
                ids, names = _s(feats["id"][:]), _s(feats["name"][:])
                ftype = _s(feats["feature_type"][:]) if "feature_type" in feats else None
                genome = _s(feats["genome"][:]) if "genome" in feats else None
            else:
                keys = list(f.keys())
                if not keys:
                    raise InputError(path, "empty HDF5 file")
                g = f[keys[0]]
                ids, names = _s(g["genes"][:]), _s(g["gene_names"][:])
                ftype, genome = None, [keys[0]] * len(ids)
            data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
            n_genes, n_bc = (int(v) for v in g["shape"][:])
            barcodes = _s(g["barcodes"][:])
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read as a 10x HDF5 matrix ({type(exc).__name__}: {exc})") from exc
    if len(indptr) != n_bc + 1 or len(barcodes) != n_bc or len(ids) != n_genes:
        raise InputError(path, "inconsistent matrix shape, barcodes and features (truncated file?)")
    m = sp.csr_matrix(
        (data, indices, indptr), shape=(n_bc, n_genes)
    )  # CSC genes x barcodes == CSR transposed
    feats = _features(ids, names, ftype, genome)
    if ftype is not None:
        keep = ftype == "Gene Expression"
        if keep.any() and not keep.all():
            m, feats = m[:, np.flatnonzero(keep)], feats[keep].reset_index(drop=True)
    return check_counts(m, path), barcodes, feats, library_id


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _first(folder: Path, *names: str) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def read_10x_mex(folder: str | Path) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame, None]:
    """Read a 10x MEX triplet folder (``matrix.mtx[.gz]``, ``barcodes.tsv[.gz]``, ``features.tsv[.gz]``/``genes.tsv``).

    Returns:
        As `read_10x_h5` (MEX files record no library id: None).
    """
    import scipy.io

    folder = Path(folder)
    mtx = _first(folder, "matrix.mtx.gz", "matrix.mtx")
    bcf = _first(folder, "barcodes.tsv.gz", "barcodes.tsv")
    ftf = _first(folder, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    if mtx is None or bcf is None or ftf is None:
        raise InputError(
            folder, "MEX folder needs matrix.mtx(.gz), barcodes.tsv(.gz) and features.tsv(.gz)/genes.tsv"
        )
    try:
        with _open_text(mtx) if mtx.suffix != ".gz" else gzip.open(mtx, "rb") as fh:
            m = scipy.io.mmread(fh)
    except Exception as exc:
        raise InputError(mtx, f"cannot read the Matrix Market file ({type(exc).__name__}: {exc})") from exc
    try:
        with _open_text(bcf) as fh:
            barcodes = np.asarray([line.strip().split("\t")[0] for line in fh if line.strip()], dtype=object)
        with _open_text(ftf) as fh:
            rows = [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    except Exception as exc:
        raise InputError(folder, f"cannot read barcodes/features ({type(exc).__name__}: {exc})") from exc
    ids = np.asarray([r[0] for r in rows], dtype=object)
    names = np.asarray([r[1] if len(r) > 1 else r[0] for r in rows], dtype=object)
    ftype = np.asarray([r[2] if len(r) > 2 else "Gene Expression" for r in rows], dtype=object)
    if m.shape != (len(ids), len(barcodes)):
        raise InputError(
            mtx, f"matrix shape {m.shape} does not match {len(ids)} features x {len(barcodes)} barcodes"
        )
    m = sp.csr_matrix(m.T)
    feats = _features(ids, names, ftype)
    keep = ftype == "Gene Expression"
    if keep.any() and not keep.all():
        m, feats = m[:, np.flatnonzero(keep)], feats[keep].reset_index(drop=True)
    return check_counts(m, mtx), barcodes, feats, None


def read_tissue_positions(spatial_dir: str | Path) -> pd.DataFrame:
    """Spot positions from ``tissue_positions.csv`` (header) or ``tissue_positions_list.csv`` (no header).

    Returns:
        DataFrame indexed by barcode with the columns of `POSITION_COLUMNS` (minus barcode).
    """
    spatial_dir = Path(spatial_dir)
    new, old = spatial_dir / "tissue_positions.csv", spatial_dir / "tissue_positions_list.csv"
    path = new if new.is_file() else old
    if not path.is_file():
        raise InputError(spatial_dir, "neither tissue_positions.csv nor tissue_positions_list.csv found")
    try:
        with open(path) as fh:
            first = fh.readline()
        has_header = "barcode" in first or "in_tissue" in first
        df = pd.read_csv(path, header=0 if has_header else None)
    except Exception as exc:
        raise InputError(path, f"cannot read spot positions ({type(exc).__name__}: {exc})") from exc
    if df.shape[1] != 6:
        raise InputError(path, f"expected 6 columns ({', '.join(POSITION_COLUMNS)}), found {df.shape[1]}")
    df.columns = POSITION_COLUMNS
    df["barcode"] = df["barcode"].astype(str)
    return df.set_index("barcode")


IMAGE_KEYS = ("hires", "lowres")


def read_scalefactors(spatial_dir: str | Path) -> dict[str, float]:
    """``scalefactors_json.json`` of a Space Ranger ``spatial/`` folder ({} when absent)."""
    path = Path(spatial_dir) / "scalefactors_json.json"
    if not path.is_file():
        return {}
    try:
        sf = json.loads(path.read_text())
    except Exception as exc:
        raise InputError(path, f"cannot parse the scale factors ({exc})") from exc
    if not isinstance(sf, dict):
        raise InputError(path, "expected a JSON object of scale factors")
    out = {}
    for k, v in sf.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            continue  # e.g. regist_target_img_scalef: null
    return out


def um_per_px_from_scalefactors(scalefactors: dict[str, float], key: str | None = None) -> float | None:
    """Microns per pixel from 10x's ``spot_diameter_fullres`` (a 65 um spot): of the full-resolution image,
    or of the ``key`` (``hires``/``lowres``) image through its ``tissue_<key>_scalef``; None when unknown."""
    d = scalefactors.get("spot_diameter_fullres")
    scalef = scalefactors.get(f"tissue_{key}_scalef") if key else 1.0
    if not d or not scalef:
        return None
    return VISIUM_SCALEFACTOR_SPOT_UM / float(d) / float(scalef)


def _image_file(spatial_dir: Path, key: str) -> Path | None:
    return _first(spatial_dir, f"tissue_{key}_image.png", f"tissue_{key}_image.jpg", f"tissue_{key}_image.tif")


def spatial_images(spatial_dir: str | Path) -> dict[str, np.ndarray]:
    """The ``tissue_hires_image`` / ``tissue_lowres_image`` of ``spatial/`` as uint8 RGB arrays by 10x key."""

    out = {}
    for key in IMAGE_KEYS:
        path = _image_file(Path(spatial_dir), key)
        if path is not None:
            img = PillowImage(path)
            out[key] = img.array.copy()
            img.close()
    return out


def is_blank(image: np.ndarray) -> bool:
    """True for an image without content (one colour, e.g. the all-black hires image of some deposits)."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., :3]  # an alpha channel is not content
    if np.issubdtype(np.asarray(image).dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
        a = a * 255.0  # scanpy stores images as floats in [0, 1]
    return float(a.std()) < 1.0


def resolve_image_scale(
    image: str | Path | None,
    scalefactors: dict[str, float],
    spatial_px: np.ndarray,
    spatial_dir: str | Path | None,
    image_scale: float | None = None,
    images: dict[str, np.ndarray] | None = None,
) -> tuple[Path | None, float, str]:
    """Which image the patches come from, and its pixels per full-resolution pixel.

    Args:
        image: The user's image (full resolution, hires or lowres), or None to use ``spatial/``'s own
            hires image (unless blank) else its lowres image.
        scalefactors: 10x scale factors (``tissue_hires_scalef``, ``tissue_lowres_scalef``).
        spatial_px: Spot centres ``[N, 2]`` in full-resolution pixels.
        spatial_dir: The ``spatial/`` folder (None: no Space Ranger folder, e.g. an AnnData input).
        image_scale: An explicit scale (image px per full-resolution px) given by the user.
        images: ``spatial/``'s images already decoded (`spatial_images`), to tell a blank one without
            decoding it again.

    Returns:
        ``(image path or None, scale, how the scale was found)``.

    Raises:
        InputError: the image is neither full resolution nor a scaled copy the scale factors describe.
    """

    spatial_dir = Path(spatial_dir) if spatial_dir is not None else None
    if image is None:
        if spatial_dir is None:
            return None, 1.0, "no image"
        images = images if images is not None else spatial_images(spatial_dir)
        for key in IMAGE_KEYS:
            path = _image_file(spatial_dir, key)
            sf = scalefactors.get(f"tissue_{key}_scalef")
            if path is None or not sf or key not in images or is_blank(images[key]):
                continue
            return path, float(sf), f"{path.name} at tissue_{key}_scalef = {sf:g} (no full-resolution image given)"
        return None, 1.0, "no image"
    image = Path(image)
    if image_scale is not None:
        if not (np.isfinite(image_scale) and image_scale > 0):
            raise InputError("--image-scale", f"must be a positive number, got {image_scale}")
        return image, float(image_scale), "given by the user (--image-scale)"
    for key in IMAGE_KEYS:
        own = _image_file(spatial_dir, key) if spatial_dir is not None else None
        sf = scalefactors.get(f"tissue_{key}_scalef")
        if own is not None and sf and own.resolve() == image.resolve():
            return image, float(sf), f"the Space Ranger {key} image: tissue_{key}_scalef = {sf:g}"
    if not any(scalefactors.get(f"tissue_{k}_scalef") for k in IMAGE_KEYS):
        return image, 1.0, "full resolution (no hires/lowres scale factors to consider)"
    w, h = image_size(image)
    xy = np.asarray(spatial_px, dtype=np.float64)
    lo, hi = xy.min(0), xy.max(0)
    candidates = [(1.0, "full resolution (spot positions fit the image)")] + [
        (float(scalefactors[f"tissue_{k}_scalef"]), f"a {k} image: tissue_{k}_scalef = {scalefactors[f'tissue_{k}_scalef']:g}")
        for k in IMAGE_KEYS
        if scalefactors.get(f"tissue_{k}_scalef")
    ]
    for scale, how in candidates:
        x0, y0 = lo * scale
        x1, y1 = hi * scale
        fits = x0 >= -1 and y0 >= -1 and x1 <= w + 1 and y1 <= h + 1
        fills = scale == 1.0 or (x1 - x0) >= 0.2 * w or (y1 - y0) >= 0.2 * h
        if fits and fills:
            return image, scale, how + " (from its size, " + f"{w} x {h} px)"
    raise InputError(
        image,
        f"the spot positions (full-resolution x {lo[0]:.0f}-{hi[0]:.0f}, y {lo[1]:.0f}-{hi[1]:.0f} px) fit this "
        f"{w} x {h} px image neither at full resolution nor at the hires/lowres scale factors "
        f"{({k: v for k, v in scalefactors.items() if k.startswith('tissue_')})}; give the right image or its "
        "scale with --image-scale",
    )


def read_spaceranger(
    outs: str | Path,
    image: str | Path | None = None,
    *,
    slide_id: str | None = None,
    patient: str | None = None,
    um_per_px: float | None = None,
    image_scale: float | None = None,
    in_tissue_only: bool = True,
) -> Slide:
    """Read a Space Ranger ``outs/`` folder.

    Args:
        outs: The ``outs/`` folder.
        image: The H&E image: full resolution, or a hires/lowres copy (its scale comes from
            ``scalefactors_json.json`` or ``image_scale``). None: ``spatial/``'s hires image, else lowres.
        um_per_px: Microns per full-resolution pixel; overrides the value derived from the spot spacing.
        image_scale: Image pixels per full-resolution pixel of ``image`` (overrides the detection).
        in_tissue_only: Keep only spots flagged ``in_tissue``.

    Returns:
        A Visium `Slide` (pitch 100 um, lattice unit 55 um), gene ids harmonised to symbols, spatial =
        (pxl_col, pxl_row) full-resolution pixels, array coords = (array_row, array_col), ``image`` and
        ``image_scale`` (the image the patches come from), obs/var/library id/scale factors/images as
        ``scanpy.read_visium`` keeps them.

    Raises:
        InputError: missing or unreadable matrix/positions, barcodes that do not match, an image that fits
            neither at full resolution nor at a 10x scale factor.
    """

    outs = Path(outs)
    if not outs.is_dir():
        raise InputError(outs, "Space Ranger outs/ folder not found")
    h5 = _first(outs, "filtered_feature_bc_matrix.h5")
    mex = outs / "filtered_feature_bc_matrix"
    if h5 is not None:
        counts, barcodes, feats, library_id = read_10x_h5(h5)
        mpath = h5
    elif mex.is_dir():
        counts, barcodes, feats, library_id = read_10x_mex(mex)
        mpath = mex
    else:
        raise InputError(outs, "no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ folder")
    spatial_dir = outs / "spatial"
    pos = read_tissue_positions(spatial_dir)
    if in_tissue_only:
        pos = pos[pos["in_tissue"].astype(int) == 1]
    missing = [b for b in barcodes if b not in pos.index]
    if len(missing) == len(barcodes):
        raise InputError(
            mpath, f"no matrix barcode matches the positions in {spatial_dir} (first: {missing[:2]})"
        )
    if missing and not in_tissue_only:
        raise InputError(mpath, f"{len(missing)} matrix barcodes have no position (first: {missing[:2]})")
    keep = np.asarray([b in pos.index for b in barcodes])
    counts, barcodes = counts[np.flatnonzero(keep)], barcodes[keep]
    p = pos.loc[list(barcodes)]
    spatial = p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    array = p[["array_row", "array_col"]].to_numpy(np.int64)
    meta: dict = {"outs": str(outs), "matrix": str(mpath), "barcodes_not_in_tissue": int((~keep).sum())}
    sf_path = spatial_dir / "scalefactors_json.json"
    sf = read_scalefactors(spatial_dir)
    if um_per_px is None:
        try:
            um_per_px, how = derive_hex_um_per_px(array, spatial, VISIUM_PITCH_UM, outs)
        except InputError:
            um_per_px = um_per_px_from_scalefactors(sf)
            if um_per_px is None:
                raise InputError(
                    outs, "cannot derive um per pixel: too few spots and no spot_diameter_fullres"
                ) from None
            how = "from spot_diameter_fullres (65 um)"
        alt = um_per_px_from_scalefactors(sf)
        if alt is not None:
            meta["um_per_px_from_scalefactors"] = alt
            if abs(alt - um_per_px) / um_per_px > 0.25:
                raise InputError(
                    sf_path,
                    f"inconsistent um per pixel: {um_per_px:.3f} from spot spacing vs {alt:.3f} from "
                    "spot_diameter_fullres; are the positions for another image?",
                )
        meta["um_per_px_source"] = how
    else:
        if not (np.isfinite(um_per_px) and um_per_px > 0):
            raise InputError("--um-per-px", f"must be a positive number, got {um_per_px}")
        meta["um_per_px_source"] = "given by the user"
    images = spatial_images(spatial_dir)
    image_path, scale, scale_how = resolve_image_scale(image, sf, spatial, spatial_dir, image_scale, images)
    meta["image_scale_source"] = scale_how
    obs = pd.DataFrame(
        {
            "in_tissue": p["in_tissue"].astype(np.int64).to_numpy(),
            "array_row": p["array_row"].astype(np.int64).to_numpy(),
            "array_col": p["array_col"].astype(np.int64).to_numpy(),
        },
        index=pd.Index(list(barcodes)),
    )
    sid = slide_id or (outs.parent.name if outs.name == "outs" else outs.name)
    slide = Slide(
        slide_id=sid,
        spatial=spatial,
        barcodes=barcodes,
        genes=feats["gene_ids"].to_numpy(dtype=object),
        counts=counts,
        array_coords=array,
        um_per_px=float(um_per_px),
        spot_pitch_um=VISIUM_PITCH_UM,
        lattice_unit_um=VISIUM_SPOT_UM,
        technology="visium",
        patient=patient,
        image=str(image_path) if image_path else None,
        image_scale=scale if image_path else None,
        meta=meta,
        obs=obs,
        var=feats[["gene_ids", "feature_types", "genome"]].copy(),
        library_id=library_id or sid,
        spatial_images=images,
        scalefactors=sf,
    )
    return harmonise_slide(slide, symbols=feats["gene_symbols"].to_numpy(dtype=object))
