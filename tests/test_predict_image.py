"""`hist-st predict --image`: H&E-only prediction end to end on a tiny synthetic image and model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hist_st.cli import main
from hist_st.encoders import Encoder, register_encoder
from hist_st.errors import InputError
from hist_st.predict_image import MATCH_PITCH_FRACTION, predict_image
from hist_st.slide import write_prepared
from hist_st.train.checkpoint import (
    lattice_type_for,
    load_bundle,
    load_checkpoint,
    save_checkpoint,
    training_inputs,
)

PITCH_UM, UPP, PATCH = 40.0, 2.0, {"size_px": 32, "um_per_px": 2.0}
CENTRE, RADIUS = (150.0, 150.0), 100.0
GENES = [f"G{i}" for i in range(8)]


@register_encoder("test-predimg")
def _tiny_encoder(weights=None, device=None) -> Encoder:
    """A fixed random 6-d encoder (mean colour-ish features) that keeps the test fast."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 8, 8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    return Encoder("test-predimg", model.eval(), 6, 32, weights_id="seed0")


def _image(folder, resolution=True):
    """White glass with a textured purple disc of radius 100 px at (150, 150); 2 um/px in the TIFF tags."""
    rng = np.random.default_rng(0)
    h, w = 300, 400
    img = np.full((h, w, 3), (236, 232, 240), np.float32)
    yy, xx = np.mgrid[:h, :w]
    disc = (xx - CENTRE[0]) ** 2 + (yy - CENTRE[1]) ** 2 < RADIUS**2
    # a pinker half on the right so expression can follow the image
    base = np.where((xx > CENTRE[0])[..., None], (200, 110, 170), (150, 100, 200)).astype(np.float32)
    img[disc] = (base[disc] + rng.normal(0, 30, size=(int(disc.sum()), 3))).clip(0, 255)
    img = img.astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    if resolution:
        import tifffile

        path = folder / "he.tif"
        tifffile.imwrite(
            path, img, photometric="rgb", resolution=(1e4 / UPP, 1e4 / UPP), resolutionunit="CENTIMETER"
        )
    else:
        from PIL import Image

        path = folder / "he_nores.png"
        Image.fromarray(img).save(path)
    return path


def _training_slide(path, slide_id, seed):
    """A 'measured' Visium-like slide on the image: pseudo-spots + embeddings + counts that follow them."""
    from hist_st.embed import embed_he_slide
    from hist_st.tissue import pseudo_spot_grid

    s = pseudo_spot_grid(path, pitch_um=PITCH_UM, lattice="hex", lattice_unit_um=22.0, slide_id=slide_id)
    embed_he_slide(s, encoder="test-predimg", patch_px=PATCH["size_px"], patch_um_per_px=PATCH["um_per_px"],
                   progress=False)
    rng = np.random.default_rng(seed)
    right = (s.spatial[:, 0] > CENTRE[0]).astype(float)
    rate = np.exp(1.0 + np.outer(right, np.linspace(-1, 1, len(GENES))))
    s.counts = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
    s.genes = np.asarray(GENES, dtype=object)
    s.technology = "visium"
    return s.validate()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hist_st.train.config import load_config
    from hist_st.train.loop import train

    root = tmp_path_factory.mktemp("predimg")
    image = _image(root / "img")
    slides = [_training_slide(image, f"s{i}", i) for i in range(2)]
    cfg = load_config(None, ["model.dim=32", "model.heads=4", "genes.n_top=6", "epochs=2", "progress=false"])
    res = train(cfg, slides, out_dir=root / "run")
    # record how the embeddings were made (what `train` stores with `training_inputs`)
    ckpt = load_checkpoint(res.checkpoint)
    ckpt.pop("format"), ckpt.pop("version")
    if "inputs" not in ckpt:
        ckpt["inputs"] = training_inputs(slides)
    save_checkpoint(res.checkpoint, ckpt)
    reference = write_prepared(slides[0], root / "s0.h5ad")
    return {"root": root, "image": image, "model": res.checkpoint, "reference": reference}


def test_checkpoint_records_grid_and_inputs(setup):
    b = load_bundle(setup["model"])
    assert b.spot_pitch_um == {"visium": PITCH_UM} and b.lattice_unit_um == {"visium": 22.0}
    assert b.lattice_type == {"visium": "hex"}
    assert b.inputs["encoder"] == "test-predimg" and b.inputs["patch"] == PATCH
    assert lattice_type_for("st") == "square" and lattice_type_for("visium") == "hex"
    assert lattice_type_for("mystery") is None


def test_predict_image_end_to_end(setup, tmp_path):
    import anndata as ad

    bundle = load_bundle(setup["model"])
    out = tmp_path / "pred"
    summary = predict_image(bundle, setup["image"], out, mc_samples=3, reference=setup["reference"])
    assert summary["um_per_px"] == UPP and summary["um_per_px_source"] == "recorded in the image file"
    g = summary["grid"]
    assert (g["pitch_um"], g["lattice"], g["lattice_unit_um"], g["encoder"]) == (
        PITCH_UM,
        "hex",
        22.0,
        "test-predimg",
    )
    assert g["patch"] == PATCH and g["sources"]["patch"] == "checkpoint"

    a = ad.read_h5ad(out / "he.h5ad")
    n = a.n_obs
    assert n == summary["n_pseudo_spots"]
    assert list(a.var_names) == bundle.genes
    assert a.uns["hist_st"]["kind"] == "prediction"
    pred, std = np.asarray(a.X), a.layers["mc_std"]  # X holds the predicted counts (scanpy plots them)
    assert pred.shape == std.shape == (n, len(bundle.genes))
    assert np.isfinite(pred).all() and (pred >= 0).all() and (std >= 0).all() and std.max() > 0
    np.testing.assert_allclose(a.layers["log1p"], np.log1p(pred), rtol=1e-6)
    assert {"array_row", "array_col", "in_tissue"} <= set(a.obs.columns)
    assert summary["heatmap_values"].startswith("log1p(counts per 10k")
    # the hex grid's neighbour graph is stored for squidpy: interior spots have 6 neighbours
    deg = np.asarray(a.obsp["spatial_connectivities"].sum(1)).ravel()
    assert deg.max() == 6 and np.median(deg) == 6 and a.uns["spatial_neighbors"]["params"]["n_neighbors"] == 6
    # pseudo-spots lie on the disc, as many as a hex grid at the pitch puts there
    xy = a.obsm["spatial"]
    r = np.hypot(xy[:, 0] - CENTRE[0], xy[:, 1] - CENTRE[1])
    assert (r < RADIUS + 8).all()
    pitch_px = PITCH_UM / UPP
    expected = np.pi * RADIUS**2 / (pitch_px**2 * np.sqrt(3) / 2)
    assert abs(n - expected) / expected < 0.15
    assert "hires" in a.uns["spatial"]["he"]["images"]  # scanpy.pl.spatial finds the thumbnail
    assert "X_test-predimg" in a.obsm

    assert len(summary["heatmaps"]) == 4 and len(summary["genes_plotted"]) == 4
    for p in summary["heatmaps"]:
        assert p.endswith(".png") and (out / p.split("/")[-1]).stat().st_size > 1000
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["n_pseudo_spots"] == n and on_disk["mc_samples"] == 3

    ref = summary["reference"]  # the reference is a grid on the same image: a perfect match
    assert ref["match_distance_um"] == MATCH_PITCH_FRACTION * PITCH_UM
    assert ref["coverage"] == 1.0 and ref["precision"] == 1.0
    c = ref["correlation"]
    assert c["n_pairs"] == n and -1 <= c["pooled_pearson"] <= 1 and -1 <= c["mean_gene_pearson"] <= 1
    assert -1 <= c["map_pearson"] <= 1
    assert "at_measured_spots" in ref


def test_missing_resolution_and_bad_genes(setup, tmp_path):
    bundle = load_bundle(setup["model"])
    nores = _image(tmp_path / "img", resolution=False)
    with pytest.raises(InputError, match="--um-per-px"):
        predict_image(bundle, nores, tmp_path / "out")
    with pytest.raises(InputError, match=r"--genes: not among the model's 6 genes: \['NOPE'\]"):
        predict_image(bundle, nores, tmp_path / "out", um_per_px=UPP, genes_to_plot=["NOPE"])
    assert not (tmp_path / "out").exists()  # checked before any work or output
    with pytest.raises(InputError, match="image not found"):
        predict_image(bundle, tmp_path / "missing.jpg", tmp_path / "out", um_per_px=UPP)


def test_cli_predict_image(setup, tmp_path, capsys):
    nores = _image(tmp_path / "img", resolution=False)
    out = tmp_path / "cli"
    argv = ["predict", "--image", str(nores), "--model", str(setup["model"]), "--out", str(out),
            "--um-per-px", str(UPP), "--genes", "G0,G7", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["genes_plotted"] == ["G0", "G7"] and printed["um_per_px"] == UPP
    assert (out / "he_nores.h5ad").is_file() and (out / "he_nores_G0.png").is_file()
    assert (out / "he_nores_G7.png").is_file() and (out / "summary.json").is_file()
    with pytest.raises(SystemExit):  # --image and --slides are mutually exclusive
        main(["predict", "--image", str(nores), "--slides", str(tmp_path), "--model", str(setup["model"]),
              "--out", str(out)])
    assert main(["predict", "--slides", str(tmp_path), "--model", str(setup["model"]), "--out", str(out),
                 "--um-per-px", "1"]) != 0
    assert "--um-per-px" in capsys.readouterr().err
