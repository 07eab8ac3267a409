"""The AnnData API (`hist_st.pp`, `hist_st.tl`) gives the numbers of the CLI path it wraps: `pp.embed` and
`pp.lattice` those ``hist-st prepare`` writes, `tl.predict` those ``hist-st predict`` writes; plus the
lattice against a grid whose sites are known, scanpy conventions (``copy``, ``key_added``) and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import hist_st
from hist_st import pp, tl
from hist_st.cli import main
from hist_st.encoders import Encoder, register_encoder
from hist_st.errors import InputError
from hist_st.train.toy import write_toy_cohort
from test_prepare import _section

ENCODER = "test-pp-tiny"
PATCH = ["--patch-px", "32", "--patch-um-per-px", "3.5"]
TINY_TRAIN = ["--genes", "hvg:6", "model.dim=16", "model.heads=2", "epochs=2", "--no-progress"]


@register_encoder(ENCODER)
def _tiny(weights=None, device=None) -> Encoder:
    """A fixed random 8-d encoder: the numbers compared are the pipeline's, not the encoder's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    return Encoder(ENCODER, model, 8, 32, weights_id="seed0")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``hist-st prepare`` of one section: (prepared AnnData, its image)."""
    root = tmp_path_factory.mktemp("raw")
    image = _section(root, "A1", [f"G{i}" for i in range(6)], image="tif", n_x=6, n_y=5)
    out = root.parent / "cohort"
    assert main(["prepare", "--format", "her2st", "--input", str(root), "--out", str(out), "--encoder", ENCODER,
                 *PATCH, "--no-progress"]) == 0  # fmt: skip
    return ad.read_h5ad(out / "A1.h5ad"), image


def test_embed_gives_the_embeddings_prepare_writes(prepared, tmp_path):
    adata, image = prepared
    raw = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"spatial": adata.obsm["spatial"].copy()})
    um_per_px = float(adata.uns["hist_st"]["um_per_px"])
    out = pp.embed(raw, image, encoder=ENCODER, um_per_px=um_per_px, patch_px=32, patch_um_per_px=3.5, copy=True)
    assert "X_hist_embedding" not in raw.obsm  # copy=True leaves the input alone
    np.testing.assert_array_equal(out.obsm["X_hist_embedding"], adata.obsm[f"X_{ENCODER}"])
    np.testing.assert_array_equal(out.obs["X_hist_embedding_outside"].to_numpy(), adata.obs["patch_outside"].to_numpy())
    params = out.uns["X_hist_embedding"]["params"]
    assert params["encoder"] == ENCODER and params["patch_px"] == 32 and params["um_per_px"] == um_per_px
    out.write_h5ad(tmp_path / "embedded.h5ad")  # what it writes is storable
    back = ad.read_h5ad(tmp_path / "embedded.h5ad")
    np.testing.assert_array_equal(back.obsm["X_hist_embedding"], out.obsm["X_hist_embedding"])
    # in place, another key; um/px read from the prepared slide's own record
    assert pp.embed(adata, image, encoder=ENCODER, patch_px=32, patch_um_per_px=3.5, key_added="X_again") is None
    np.testing.assert_array_equal(adata.obsm["X_again"], adata.obsm[f"X_{ENCODER}"])


def test_embed_refuses_spots_outside_the_image_and_unknown_resolution(prepared):
    adata, image = prepared
    far = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"spatial": adata.obsm["spatial"] * 100.0})
    with pytest.raises(InputError, match="spot centres lie outside the image"):
        pp.embed(far, image, encoder=ENCODER, um_per_px=1.0, patch_px=32, patch_um_per_px=3.5)
    bare = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"spatial": adata.obsm["spatial"].copy()})
    with pytest.raises(InputError, match="um_per_px"):  # a plain TIFF records no resolution
        pp.embed(bare, image, encoder=ENCODER, patch_px=32, patch_um_per_px=3.5)
    with pytest.raises(InputError, match="obsm\\['spatial'\\]"):
        pp.embed(ad.AnnData(obs=adata.obs[[]].copy()), image, encoder=ENCODER, um_per_px=1.0)


def test_lattice_gives_the_sites_prepare_writes(prepared, tmp_path):
    adata, _ = prepared
    raw = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"spatial": adata.obsm["spatial"].copy()})
    info = adata.uns["hist_st"]
    out = pp.lattice(raw, um_per_px=float(info["um_per_px"]), technology="st", copy=True)
    np.testing.assert_array_equal(out.obsm["lattice"], adata.obsm["lattice"])
    assert out.uns["lattice"]["lattice_unit_um"] == pytest.approx(float(info["lattice_unit_um"]))
    assert out.uns["lattice"]["neighbour_adjacency"] == 1.0
    out.write_h5ad(tmp_path / "lattice.h5ad")
    assert ad.read_h5ad(tmp_path / "lattice.h5ad").uns["lattice"]["grid"]["kind"] == "square"


def test_lattice_of_a_known_grid():
    """A rotated-free square grid with holes: sites are the grid indices, shifted to start at 0."""
    rng = np.random.default_rng(3)
    ij = np.array([(i, j) for i in range(7) for j in range(5) if rng.random() > 0.2])
    xy = 100.0 + ij * 25.0  # 25 px pitch at 4 um/px = 100 um
    adata = ad.AnnData(obs={"i": ij[:, 0]}, obsm={"spatial": xy})
    adata.obs_names = [f"s{k}" for k in range(len(ij))]
    pp.lattice(adata, um_per_px=4.0, pitch_um=100.0, key_added="sites")
    np.testing.assert_array_equal(adata.obsm["sites"], ij - ij.min(0))
    assert adata.uns["sites"]["spot_pitch_um"] == pytest.approx(100.0)
    with pytest.raises(InputError, match="um_per_px"):
        pp.lattice(ad.AnnData(obsm={"spatial": xy}))  # nothing recorded, nothing given
    with pytest.raises(InputError, match="pitch_um"):
        pp.lattice(adata, um_per_px=4.0, pitch_um=-1.0)


def test_lattice_of_a_sparse_subset_measures_the_grid_without_a_false_warning():
    """A sparse subset of a 100 um hex grid (like the 100 spots of a public Visium subset): the nearest-
    neighbour distance overestimates the pitch; the measured grid wins, with no warning about a "declared"
    pitch that nobody declared; the um/px given to `lattice` is reused by the next step."""
    import warnings

    from hist_st.io._util import GridWarning

    rng = np.random.default_rng(0)
    rows, cols = np.meshgrid(np.arange(30), np.arange(0, 60, 2), indexing="ij")
    cols = cols + (rows % 2)  # Visium array coordinates: odd rows shifted by one column
    keep = rng.choice(rows.size, size=60, replace=False)
    r, c = rows.ravel()[keep], cols.ravel()[keep]
    xy = np.stack([c * 50.0, r * 50.0 * np.sqrt(3)], 1) / 0.5 + 300.0  # 100 um pitch at 0.5 um/px
    adata = ad.AnnData(obsm={"spatial": xy})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pp.lattice(adata, um_per_px=0.5)
    assert not [w for w in caught if w.category is GridWarning], [str(w.message) for w in caught]
    assert adata.uns["lattice"]["spot_pitch_um"] == pytest.approx(100.0, rel=0.02)
    assert len({tuple(s) for s in adata.obsm["lattice"]}) == len(keep)
    assert pp.spots_of(adata).um_per_px == 0.5  # recorded by lattice, found by the next step


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy cohort, a model trained on two slides and ``hist-st predict`` of the third."""
    cohort = write_toy_cohort(tmp_path_factory.mktemp("toy"), n_slides=3, n_spots=60, n_genes=10, dim=8)
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--slides", str(cohort), "--out", str(run), "--ids", "toy00,toy01", *TINY_TRAIN]) == 0
    pred = tmp_path_factory.mktemp("pred") / "pred"
    assert main(["predict", "--model", str(run), "--slides", str(cohort), "--ids", "toy02", "--out", str(pred),
                 "--no-progress"]) == 0  # fmt: skip
    return cohort, run, pred


def test_predict_gives_the_predictions_of_the_cli(toy, tmp_path):
    cohort, run, pred = toy
    adata = ad.read_h5ad(cohort / "toy02.h5ad")
    cli = ad.read_h5ad(pred / "toy02.h5ad")
    tl.predict(adata, run, use_rep="X_toy")
    np.testing.assert_array_equal(adata.obsm["predicted"], np.asarray(cli.X))
    assert adata.uns["predicted"]["genes"] == list(cli.var_names)
    assert adata.uns["predicted"]["params"]["embedding"] == "toy"
    adata.write_h5ad(tmp_path / "predicted.h5ad")
    assert list(ad.read_h5ad(tmp_path / "predicted.h5ad").uns["predicted"]["genes"]) == list(cli.var_names)


def test_predict_of_a_bare_anndata_measures_the_grid_like_prepare(toy):
    """Without hist-st's record the grid is measured on the spot (as prepare does): same predictions."""
    cohort, run, pred = toy
    adata = ad.read_h5ad(cohort / "toy02.h5ad")
    bare = ad.AnnData(obs=adata.obs[[]].copy(), obsm={"spatial": adata.obsm["spatial"], "emb": adata.obsm["X_toy"]})
    out = tl.predict(bare, run, use_rep="emb", um_per_px=float(adata.uns["hist_st"]["um_per_px"]), mc_samples=3,
                     key_added="hist", copy=True)  # fmt: skip
    assert "hist" not in bare.obsm and out.obsm["hist_std"].shape == out.obsm["hist"].shape
    ref = tl.predict(adata, run, use_rep="X_toy", mc_samples=3, copy=True)
    np.testing.assert_allclose(out.obsm["hist"], ref.obsm["predicted"], rtol=1e-6)
    with pytest.raises(InputError, match="use_rep"):
        tl.predict(bare, run, use_rep="X_missing")
    with pytest.raises(InputError, match="width"):
        tl.predict(ad.AnnData(obs=bare.obs, obsm={"spatial": bare.obsm["spatial"], "emb": bare.obsm["emb"][:, :3]}),
                   run, use_rep="emb", um_per_px=1.0)  # fmt: skip


def test_the_package_exports_pp_tl_pl_lazily():
    assert hist_st.pp is pp and hist_st.tl is tl and {"pp", "tl", "pl"} <= set(dir(hist_st))
    code = "import sys, hist_st; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


HEART = Path(__file__).resolve().parents[2] / "shared" / "data" / "visium-heart" / "outs"


@pytest.mark.skipif(not HEART.is_dir(), reason=f"real Visium folder absent: {HEART}")
def test_embed_of_scanpy_read_visium_finds_scale_and_resolution_like_prepare(tmp_path):
    """`scanpy.read_visium` keeps 10x's scale factors in ``uns['spatial']``: `pp.embed` on its lowres image
    needs no ``um_per_px`` or ``image_scale`` and gives the embeddings `hist-st prepare` writes for the folder."""
    import scanpy as sc

    out = tmp_path / "cohort"
    assert main(["prepare", "--format", "spaceranger", "--input", str(HEART), "--out", str(out),
                 "--encoder", ENCODER, *PATCH, "--no-progress"]) == 0
    ref = ad.read_h5ad(next(out.glob("*.h5ad")))
    adata = sc.read_visium(HEART)
    with pytest.warns(UserWarning, match="enlarged"):
        pp.embed(adata, HEART / "spatial" / "tissue_lowres_image.png", encoder=ENCODER, patch_px=32,
                 patch_um_per_px=3.5)
    params = adata.uns["X_hist_embedding"]["params"]
    sf = adata.uns["spatial"][next(iter(adata.uns["spatial"]))]["scalefactors"]
    assert params["image_scale"] == pytest.approx(sf["tissue_lowres_scalef"])
    assert params["um_per_px"] == pytest.approx(ref.uns["hist_st"]["um_per_px"])
    emb = adata[ref.obs_names].obsm["X_hist_embedding"]
    np.testing.assert_allclose(emb, ref.obsm[f"X_{ENCODER}"], rtol=1e-5, atol=1e-6)
