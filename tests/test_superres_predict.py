"""Prediction with a coarse-supervised model: fine maps from `predict --image`, and the label resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hist_st.cli import main
from hist_st.errors import InputError
from hist_st.predict_image import predict_image
from hist_st.train.checkpoint import load_bundle, load_checkpoint, save_checkpoint, training_inputs
from test_predict_image import PITCH_UM, _image, _training_slide


@pytest.fixture(scope="module")
def coarse_model(tmp_path_factory):
    from hist_st.slide import write_prepared
    from hist_st.train.config import load_config
    from hist_st.train.loop import train

    root = tmp_path_factory.mktemp("srpred")
    image = _image(root / "img")
    slides = [_training_slide(image, f"s{i}", i) for i in range(2)]
    cfg = load_config(None, ["model.dim=16", "model.heads=2", "genes.n_top=6", "epochs=2", "progress=false",
                             "supervise=coarse2"])  # fmt: skip
    res = train(cfg, slides, out_dir=root / "run")
    ckpt = load_checkpoint(res.checkpoint)
    ckpt.pop("format"), ckpt.pop("version")
    ckpt.setdefault("inputs", training_inputs(slides))
    save_checkpoint(res.checkpoint, ckpt)
    return {"root": root, "image": image, "model": res.checkpoint, "reference": write_prepared(slides[0], root / "s0.h5ad")}


def test_fine_and_label_resolution_maps(coarse_model, tmp_path):
    import anndata as ad

    bundle = load_bundle(coarse_model["model"])
    fine = predict_image(bundle, coarse_model["image"], tmp_path / "fine", reference=coarse_model["reference"])
    res = fine["map_resolution"]
    assert res["resolution"] == "fine" and res["map_pitch_um"] == PITCH_UM == res["pseudo_spot_pitch_um"]
    assert res["label_pitch_um"] == 2 * PITCH_UM and "2x finer than its labels" in res["note"]
    a = ad.read_h5ad(tmp_path / "fine" / "he.h5ad")
    assert a.n_obs == fine["n_pseudo_spots"] and "hires" in a.uns["spatial"]["he"]["images"]
    assert fine["reference"]["coverage"] == 1.0
    labels = predict_image(bundle, coarse_model["image"], tmp_path / "labels", map_resolution="labels",
                           reference=coarse_model["reference"])  # fmt: skip
    b = ad.read_h5ad(tmp_path / "labels" / "he.h5ad")
    assert labels["map_resolution"]["map_pitch_um"] == 2 * PITCH_UM and fine["n_pseudo_spots"] / 4 <= b.n_obs < a.n_obs
    # the label-resolution map is the fine map summed over blocks: same total per gene
    np.testing.assert_allclose(np.asarray(b.X).sum(0), np.asarray(a.X).sum(0), rtol=1e-4)
    assert labels["reference"]["match_distance_um"] == pytest.approx(0.75 * 2 * PITCH_UM)
    assert all((tmp_path / "labels" / p.split("/")[-1]).stat().st_size > 1000 for p in labels["heatmaps"])
    with pytest.raises(InputError, match="--resolution"):
        predict_image(bundle, coarse_model["image"], tmp_path / "bad", map_resolution="half")


def test_predictions_record_their_supervision(coarse_model, tmp_path, capsys):
    from hist_st.slide import read_prepared
    from hist_st.train.predict import predict_slide

    bundle = load_bundle(coarse_model["model"])
    pred = predict_slide(bundle, read_prepared(coarse_model["reference"]))
    sup = pred.meta["prediction"]["supervision"]
    assert (sup["supervise"], sup["block"], sup["token_pitch_um"], sup["label_pitch_um"]) == ("coarse2", 2, PITCH_UM,
                                                                                               2 * PITCH_UM)
    assert main(["predict", "--slides", str(coarse_model["root"]), "--model", str(coarse_model["model"]),
                 "--out", str(tmp_path / "p"), "--resolution", "labels"]) != 0  # fmt: skip
    assert "--resolution: only apply with --image" in capsys.readouterr().err


def test_cli_train_supervise_at(tmp_path, capsys):
    from hist_st.train.toy import write_toy_cohort

    cohort = write_toy_cohort(tmp_path / "toy", n_slides=2, n_spots=40, n_genes=6, dim=8)
    assert main(["train", "--slides", str(cohort), "--out", str(tmp_path / "run"), "--supervise-at", "coarse2",
                 "epochs=1", "model.dim=16", "model.heads=2", "--no-progress"]) == 0  # fmt: skip
    assert load_bundle(tmp_path / "run" / "model.pt").config["supervise"] == "coarse2"
    assert main(["train", "--slides", str(cohort), "--out", str(tmp_path / "bad"), "--supervise-at", "blocks"]) == 2
    assert "supervise must be 'spot'" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["epoch"] == 1
