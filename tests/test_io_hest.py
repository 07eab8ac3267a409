"""HEST-1k sample reader and prepare from stored patches or the pyramidal WSI; AnnData + image reader."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.io import find_hest_samples, read_anndata, read_hest

UPP = 1.0  # full-res um per px; patches: 224 px at 0.5 um/px = 112 px at full res


def _counts_adata(n_side=4, pitch_px=100.0, seed=0, tech_cols=True, ensembl=False):
    import anndata as ad

    rng = np.random.default_rng(seed)
    rc = np.array([(r, c) for r in range(n_side) for c in range(r % 2, 2 * n_side, 2)])
    xy = np.column_stack([80 + rc[:, 1] * pitch_px / 2, 80 + rc[:, 0] * pitch_px * np.sqrt(3) / 2])
    n = len(rc)
    genes = (
        [f"ENSG{i:011d}.{i % 3 + 1}" for i in range(5)]
        if ensembl
        else ["ACTB", "GAPDH", "ERBB2", "KRT19", "CD74"]
    )
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(5, size=(n, 5)).astype(np.float32)))
    a.obs_names = [f"bc{i}" for i in range(n)]
    a.var_names = genes
    if tech_cols:
        a.obs["array_row"], a.obs["array_col"] = rc[:, 0], rc[:, 1]
        a.obs["pxl_col_in_fullres"], a.obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
    a.obsm["spatial"] = xy
    return a, xy


def make_hest(root, sid="TENX01", patches=True, wsi=True):
    import h5py
    import tifffile

    a, xy = _counts_adata()
    for d in ("st", "metadata", "patches", "wsis"):
        (root / d).mkdir(parents=True, exist_ok=True)
    a.write_h5ad(root / "st" / f"{sid}.h5ad")
    meta = {
        "pixel_size_um_estimated": UPP,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "st_technology": "Visium",
        "organ": "Breast",
        "patient": "P1",
    }
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(1)
    h, w = int(xy[:, 1].max() + 150), int(xy[:, 0].max() + 150)
    img = rng.integers(100, 230, size=(h, w, 3), dtype=np.uint8)
    if wsi:
        with tifffile.TiffWriter(root / "wsis" / f"{sid}.tif") as tw:
            tw.write(
                img,
                tile=(64, 64),
                subifds=1,
                compression="zlib",
                photometric="rgb",
                resolution=(1e4 / UPP, 1e4 / UPP),
                resolutionunit="CENTIMETER",
            )
            tw.write(img[::2, ::2], tile=(64, 64), compression="zlib", subfiletype=1, photometric="rgb")
    if patches:
        order = np.arange(len(xy))[::-1]  # stored in another order than st/: matched by barcode
        coords = (xy[order] - 56).round().astype(np.int64)  # top-left corners
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = rng.integers(0, 255, size=(len(xy), 224, 224, 3), dtype=np.uint8)
            f["coords"] = coords
            f["barcode"] = np.array([[f"bc{i}".encode()] for i in order])
    return a, xy, img


def test_read_hest(tmp_path):
    a, xy, _ = make_hest(tmp_path)
    samples = find_hest_samples(tmp_path)
    assert [s.sample_id for s in samples] == ["TENX01"] and samples[0].patient == "P1"
    s = read_hest(tmp_path, "TENX01")
    assert (
        s.technology == "visium" and s.um_per_px == UPP and s.spot_pitch_um == 100 and s.lattice_unit_um == 55
    )
    assert s.image.endswith("TENX01.tif") and s.meta["hest_patches"].endswith("TENX01.h5")
    np.testing.assert_allclose(s.spatial, xy)
    s.validate()


@pytest.mark.parametrize("use_patches", [True, False])
def test_prepare_hest(tmp_path, use_patches):
    from hist_st.prepare import prepare_cohort
    from hist_st.slide import read_prepared
    from hist_st.sources import sources_from_hest

    make_hest(tmp_path / "hest", patches=use_patches)
    rep = prepare_cohort(
        sources_from_hest(tmp_path / "hest"),
        tmp_path / "out",
        encoder="test-tiny-hest",
        thumbnail_size=64,
        progress=False,
        log=None,
    )
    assert rep.prepared == ["TENX01"], rep.failed
    s = read_prepared(tmp_path / "out" / "TENX01.h5ad")
    assert s.embeddings["test-tiny-hest"].shape == (s.n_spots, 4) and s.patient == "P1"
    assert ("patches_from" in s.meta) == use_patches
    assert s.thumbnail is not None and s.lattice is not None


def test_read_anndata_with_image(tmp_path):
    a, xy = _counts_adata(ensembl=True, tech_cols=False)
    a.var["gene_symbols"] = ["ACTB", "GAPDH", "", "KRT19", "ACTB"]
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X.toarray())  # normalised X; counts in layers
    path = tmp_path / "s.h5ad"
    a.write_h5ad(path)
    s = read_anndata(path, tmp_path / "img.png", um_per_px=0.5)
    assert s.genes.tolist() == ["ACTB", "GAPDH", "ENSG00000000002", "KRT19"]
    assert s.meta["counts_from"] == "layers['counts']" and s.um_per_px == 0.5 and s.technology == "unknown"
    # without counts: a clear error
    del a.layers["counts"]
    a.write_h5ad(path)
    with pytest.raises(InputError, match="not integers"):
        read_anndata(path)
    b = a.copy()
    del b.obsm["spatial"]
    b.write_h5ad(path)
    with pytest.raises(InputError, match="obsm\\['spatial'\\]"):
        read_anndata(path)


def test_prepare_anndata_pitch_from_spacing(tmp_path):
    """Unknown technology, resolution from the image's TIFF tags, pitch from the spot spacing."""
    import tifffile

    from hist_st.prepare import prepare_cohort
    from hist_st.slide import read_prepared
    from hist_st.sources import source_from_anndata

    a, xy = _counts_adata(tech_cols=False)
    a.write_h5ad(tmp_path / "s.h5ad")
    img = np.full((int(xy[:, 1].max() + 100), int(xy[:, 0].max() + 100), 3), 200, np.uint8)
    tifffile.imwrite(
        tmp_path / "he.tif",
        img,
        photometric="rgb",
        resolution=(1e4 / 0.8, 1e4 / 0.8),
        resolutionunit="CENTIMETER",
    )
    rep = prepare_cohort(
        [source_from_anndata(tmp_path / "s.h5ad", tmp_path / "he.tif")],
        tmp_path / "out",
        encoder="test-tiny-hest",
        thumbnail_size=64,
        progress=False,
        log=None,
    )
    assert rep.prepared == ["s"], rep.failed
    s = read_prepared(tmp_path / "out" / "s.h5ad")
    assert s.um_per_px == pytest.approx(0.8) and s.spot_pitch_um == pytest.approx(80.0)
    assert pd.Series(s.patch_outside).dtype == bool


@pytest.fixture(autouse=True)
def _tiny_encoder():
    import torch

    from hist_st.encoders import ENCODERS, Encoder

    def make(weights=None, device=None):
        torch.manual_seed(0)
        m = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 16, 16), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        ).eval()
        return Encoder("test-tiny-hest", m, 4, 224, weights_id="seed0")

    ENCODERS["test-tiny-hest"] = make
    yield
    ENCODERS.pop("test-tiny-hest", None)
