"""10x Genomics Space Ranger ``outs/`` folders (Visium).

Reads the filtered matrix (``filtered_feature_bc_matrix.h5``, HDF5 v3 or v2, or the MEX triplet
``filtered_feature_bc_matrix/{matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz|genes.tsv}``), the spot
positions (``spatial/tissue_positions.csv`` with header, Space Ranger >= 2.0, or
``spatial/tissue_positions_list.csv`` without) and ``spatial/scalefactors_json.json``; the full-resolution
image is supplied separately.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.io._util import (
    VISIUM_PITCH_UM,
    VISIUM_SCALEFACTOR_SPOT_UM,
    VISIUM_SPOT_UM,
    check_counts,
    derive_hex_um_per_px,
)
from hist_st.slide import Slide

__all__ = ["read_spaceranger", "read_10x_h5", "read_10x_mex", "read_tissue_positions", "POSITION_COLUMNS"]

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


def read_10x_h5(path: str | Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Read a 10x HDF5 feature-barcode matrix (v3 ``matrix/`` or v2 ``<genome>/`` layout).

    Returns:
        ``(counts CSR [N, G], barcodes [N], gene ids [G], gene symbols [G])``, gene-expression features only.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                feats = g["features"]
                ids, names = _s(feats["id"][:]), _s(feats["name"][:])
                ftype = _s(feats["feature_type"][:]) if "feature_type" in feats else None
            else:
                keys = list(f.keys())
                if not keys:
                    raise InputError(path, "empty HDF5 file")
                g = f[keys[0]]
                ids, names = _s(g["genes"][:]), _s(g["gene_names"][:])
                ftype = None
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
    if ftype is not None:
        keep = ftype == "Gene Expression"
        if keep.any() and not keep.all():
            m, ids, names = m[:, np.flatnonzero(keep)], ids[keep], names[keep]
    return check_counts(m, path), barcodes, ids, names


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _first(folder: Path, *names: str) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def read_10x_mex(folder: str | Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Read a 10x MEX triplet folder (``matrix.mtx[.gz]``, ``barcodes.tsv[.gz]``, ``features.tsv[.gz]``/``genes.tsv``)."""
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
    keep = ftype == "Gene Expression"
    if keep.any() and not keep.all():
        m, ids, names = m[:, np.flatnonzero(keep)], ids[keep], names[keep]
    return check_counts(m, mtx), barcodes, ids, names


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


def read_spaceranger(
    outs: str | Path,
    image: str | Path | None = None,
    *,
    slide_id: str | None = None,
    patient: str | None = None,
    um_per_px: float | None = None,
    in_tissue_only: bool = True,
) -> Slide:
    """Read a Space Ranger ``outs/`` folder.

    Args:
        outs: The ``outs/`` folder.
        image: The full-resolution H&E image the pixel positions refer to.
        um_per_px: Overrides the derived resolution.
        in_tissue_only: Keep only spots flagged ``in_tissue``.

    Returns:
        A Visium `Slide` (pitch 100 um, lattice unit 55 um), gene ids harmonised to symbols, spatial =
        (pxl_col, pxl_row) full-resolution pixels, array coords = (array_row, array_col).

    Raises:
        InputError: missing or unreadable matrix/positions, barcodes that do not match.
    """
    from hist_st.harmonise import harmonise_slide

    outs = Path(outs)
    if not outs.is_dir():
        raise InputError(outs, "Space Ranger outs/ folder not found")
    h5 = _first(outs, "filtered_feature_bc_matrix.h5")
    mex = outs / "filtered_feature_bc_matrix"
    if h5 is not None:
        counts, barcodes, ids, names = read_10x_h5(h5)
        mpath = h5
    elif mex.is_dir():
        counts, barcodes, ids, names = read_10x_mex(mex)
        mpath = mex
    else:
        raise InputError(outs, "no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ folder")
    pos = read_tissue_positions(outs / "spatial")
    if in_tissue_only:
        pos = pos[pos["in_tissue"].astype(int) == 1]
    missing = [b for b in barcodes if b not in pos.index]
    if len(missing) == len(barcodes):
        raise InputError(
            mpath, f"no matrix barcode matches the positions in {outs / 'spatial'} (first: {missing[:2]})"
        )
    if missing and not in_tissue_only:
        raise InputError(mpath, f"{len(missing)} matrix barcodes have no position (first: {missing[:2]})")
    keep = np.asarray([b in pos.index for b in barcodes])
    counts, barcodes = counts[np.flatnonzero(keep)], barcodes[keep]
    p = pos.loc[list(barcodes)]
    spatial = p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    array = p[["array_row", "array_col"]].to_numpy(np.int64)
    meta: dict = {"outs": str(outs), "matrix": str(mpath), "barcodes_not_in_tissue": int((~keep).sum())}
    sf_path = outs / "spatial" / "scalefactors_json.json"
    sf = {}
    if sf_path.is_file():
        try:
            sf = json.loads(sf_path.read_text())
        except Exception as exc:
            raise InputError(sf_path, f"cannot parse ({exc})") from exc
    if um_per_px is None:
        try:
            um_per_px, how = derive_hex_um_per_px(array, spatial, VISIUM_PITCH_UM, outs)
        except InputError:
            d = sf.get("spot_diameter_fullres")
            if not d:
                raise InputError(
                    outs, "cannot derive um per pixel: too few spots and no spot_diameter_fullres"
                ) from None
            um_per_px, how = VISIUM_SCALEFACTOR_SPOT_UM / float(d), "from spot_diameter_fullres (65 um)"
        if sf.get("spot_diameter_fullres"):
            alt = VISIUM_SCALEFACTOR_SPOT_UM / float(sf["spot_diameter_fullres"])
            meta["um_per_px_from_scalefactors"] = alt
            if abs(alt - um_per_px) / um_per_px > 0.25:
                raise InputError(
                    sf_path,
                    f"inconsistent um per pixel: {um_per_px:.3f} from spot spacing vs {alt:.3f} from "
                    "spot_diameter_fullres; are the positions for another image?",
                )
        meta["um_per_px_source"] = how
    else:
        meta["um_per_px_source"] = "given by the user"
    meta["scalefactors"] = sf
    slide = Slide(
        slide_id=slide_id or (outs.parent.name if outs.name == "outs" else outs.name),
        spatial=spatial,
        barcodes=barcodes,
        genes=ids,
        counts=counts,
        array_coords=array,
        um_per_px=float(um_per_px),
        spot_pitch_um=VISIUM_PITCH_UM,
        lattice_unit_um=VISIUM_SPOT_UM,
        technology="visium",
        patient=patient,
        image=str(image) if image else None,
        meta=meta,
    )
    return harmonise_slide(slide, symbols=names)
