"""Space Ranger outs/ reader: HDF5 and MEX matrices, both positions formats, written here in the real format."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.io import read_spaceranger

UPP = 2.0  # um per px of the synthetic image: 100 um pitch = 50 px


def _grid(n_rows=4, n_cols=10):
    rc = [(r, c) for r in range(n_rows) for c in range(r % 2, n_cols, 2)]
    rc = np.array(rc)
    x = 30 + rc[:, 1] * (50.0 / 2) / 1.0
    y = 30 + rc[:, 0] * 50.0 * np.sqrt(3) / 2
    return rc, np.column_stack([x, y])


def make_outs(root, positions="new", matrix="h5", seed=0, n_genes=6):
    """A Space Ranger outs/ folder (plus an image) with a few off-tissue spots; returns (outs, image, truth)."""
    rng = np.random.default_rng(seed)
    rc, xy = _grid()
    n = len(rc)
    barcodes = [f"AAAC{i:04d}-1" for i in range(n)]
    in_tissue = np.ones(n, int)
    in_tissue[:2] = 0
    ids = [f"ENSG{i:011d}" for i in range(n_genes)] + ["ADT1"]
    names = [f"GENE{i}" for i in range(n_genes - 1)] + ["GENE0", "ADT1"]  # a duplicated symbol
    types = ["Gene Expression"] * n_genes + ["Antibody Capture"]
    counts = rng.poisson(3, size=(n, n_genes + 1)).astype(np.int32)
    outs = root / "sample1" / "outs"
    (outs / "spatial").mkdir(parents=True)
    tis = [f"{b},{t},{r},{c},{y:.1f},{x:.1f}" for b, t, (r, c), (x, y) in zip(barcodes, in_tissue, rc, xy)]
    if positions == "new":
        (outs / "spatial" / "tissue_positions.csv").write_text(
            "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
            + "\n".join(tis)
            + "\n"
        )
    else:
        (outs / "spatial" / "tissue_positions_list.csv").write_text("\n".join(tis) + "\n")
    (outs / "spatial" / "scalefactors_json.json").write_text(
        json.dumps(
            {"spot_diameter_fullres": 65.0 / UPP, "tissue_hires_scalef": 0.5, "fiducial_diameter_fullres": 50}
        )
    )
    mat = sp.csc_matrix(counts.T)  # genes x barcodes, as 10x stores it
    if matrix == "h5":
        import h5py

        with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
            g = f.create_group("matrix")
            g["barcodes"] = np.array(barcodes, dtype="S")
            g["data"], g["indices"], g["indptr"] = mat.data, mat.indices, mat.indptr
            g["shape"] = np.array(mat.shape, dtype=np.int32)
            ft = g.create_group("features")
            ft["id"], ft["name"] = np.array(ids, dtype="S"), np.array(names, dtype="S")
            ft["feature_type"] = np.array(types, dtype="S")
            ft["genome"] = np.array(["GRCh38"] * len(ids), dtype="S")
    else:
        import scipy.io

        mex = outs / "filtered_feature_bc_matrix"
        mex.mkdir()
        with gzip.open(mex / "matrix.mtx.gz", "wb") as fh:
            scipy.io.mmwrite(fh, sp.coo_matrix(mat))
        with gzip.open(mex / "barcodes.tsv.gz", "wt") as fh:
            fh.write("\n".join(barcodes) + "\n")
        with gzip.open(mex / "features.tsv.gz", "wt") as fh:
            fh.write("\n".join(f"{i}\t{nm}\t{t}" for i, nm, t in zip(ids, names, types)) + "\n")
    from PIL import Image

    img = rng.integers(120, 230, size=(int(xy[:, 1].max() + 60), int(xy[:, 0].max() + 60), 3), dtype=np.uint8)
    image = root / "sample1_full.png"
    Image.fromarray(img).save(image)
    return outs, image, dict(counts=counts, in_tissue=in_tissue, xy=xy, rc=rc, barcodes=barcodes)


@pytest.mark.parametrize("positions,matrix", [("new", "h5"), ("old", "mex"), ("old", "h5"), ("new", "mex")])
def test_read_spaceranger(tmp_path, positions, matrix):
    outs, image, truth = make_outs(tmp_path, positions, matrix)
    s = read_spaceranger(outs, image)
    keep = truth["in_tissue"] == 1
    assert s.slide_id == "sample1" and s.technology == "visium"
    assert s.n_spots == keep.sum() and s.barcodes.tolist() == list(np.array(truth["barcodes"])[keep])
    assert s.genes.tolist() == ["GENE0", "GENE1", "GENE2", "GENE3", "GENE4"]  # ids -> symbols, ADT dropped
    c = truth["counts"][keep]
    np.testing.assert_array_equal(s.counts.toarray()[:, 0], c[:, 0] + c[:, 5])  # duplicated symbol summed
    np.testing.assert_allclose(s.spatial, truth["xy"][keep], atol=0.06)
    np.testing.assert_array_equal(s.array_coords, truth["rc"][keep])
    assert s.um_per_px == pytest.approx(UPP, rel=1e-3)
    assert s.spot_pitch_um == 100 and s.lattice_unit_um == 55
    s.validate()


def test_spaceranger_errors(tmp_path):
    outs, image, _ = make_outs(tmp_path)
    pos = outs / "spatial" / "tissue_positions.csv"
    text = pos.read_text()
    pos.write_text(text.replace("AAAC", "TTTT"))
    with pytest.raises(InputError, match="no matrix barcode matches"):
        read_spaceranger(outs, image)
    pos.write_text(text)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": 10.0}))
    with pytest.raises(InputError, match="inconsistent um per pixel"):
        read_spaceranger(outs, image)
    (outs / "filtered_feature_bc_matrix.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="filtered_feature_bc_matrix.h5"):
        read_spaceranger(outs, image)
    with pytest.raises(InputError, match="not found"):
        read_spaceranger(tmp_path / "missing")


def test_prepare_spaceranger_cli(tmp_path, capsys):
    from hist_st.cli import main

    outs, image, _ = make_outs(tmp_path)
    rc = main(
        [
            "prepare",
            "--format",
            "spaceranger",
            "--input",
            str(outs),
            "--image",
            str(image),
            "--out",
            str(tmp_path / "prep"),
            "--patch-px",
            "32",
            "--patch-um-per-px",
            "3.5",
            "--no-progress",
            "--encoder",
            "test-tiny-sr",
        ]
    )
    assert rc == 0, capsys.readouterr()
    from hist_st.slide import read_prepared

    s = read_prepared(tmp_path / "prep" / "sample1.h5ad")
    assert (
        s.technology == "visium" and s.lattice is not None and len(np.unique(s.lattice, axis=0)) == s.n_spots
    )


@pytest.fixture(autouse=True)
def _tiny_encoder():
    import torch

    from hist_st.encoders import ENCODERS, Encoder

    def make(weights=None, device=None):
        torch.manual_seed(0)
        m = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 8, 8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        ).eval()
        return Encoder("test-tiny-sr", m, 4, 32, weights_id="seed0")

    ENCODERS["test-tiny-sr"] = make
    yield
    ENCODERS.pop("test-tiny-sr", None)
