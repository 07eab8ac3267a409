"""Sub-spot tokens: four patches per legacy-ST spot, supervised by the spot's counts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hist_st.errors import InputError
from hist_st.train.coarse import coarse_slide_data
from hist_st.train.subspot import subspot_offsets, subspot_slide
from test_predict_image import CENTRE, GENES, _image

PITCH = 40.0  # um; the test image has 2 um per pixel


def _square_slide(image, slide_id, seed, lattice="square"):
    from hist_st.embed import embed_he_slide
    from hist_st.tissue import pseudo_spot_grid

    s = pseudo_spot_grid(image, pitch_um=PITCH, lattice=lattice, lattice_unit_um=PITCH, slide_id=slide_id)
    embed_he_slide(s, encoder="test-predimg", patch_px=32, patch_um_per_px=2.0, progress=False)
    rng = np.random.default_rng(seed)
    right = (s.spatial[:, 0] > CENTRE[0]).astype(float)
    s.counts = sp.csr_matrix(rng.poisson(np.exp(1.0 + np.outer(right, np.linspace(-1, 1, len(GENES))))).astype(np.float32))
    s.genes = np.asarray(GENES, dtype=object)
    s.technology = "st"
    s.meta["encoder"] = "test-predimg"
    return s.validate()


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    image = _image(tmp_path_factory.mktemp("subspot") / "img")
    return image, [_square_slide(image, f"s{i}", i) for i in range(2)]


def test_offsets_tile_the_cell():
    off = subspot_offsets(2, 4.0, 0.0)
    assert sorted(map(tuple, off)) == [(-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)]
    rot = subspot_offsets(3, 6.0, 90.0)
    assert np.allclose(np.sort(np.abs(rot).ravel()), np.sort(np.abs(subspot_offsets(3, 6.0, 0.0)).ravel()))
    assert np.allclose(rot.mean(0), 0) and len(rot) == 9


def test_subspot_slide_splits_each_spot(slides):
    _, (s, _) = slides
    sub = subspot_slide(s, 2)
    parent = np.asarray(sub.obs["parent"])
    assert sub.n_spots == 4 * s.n_spots and np.array_equal(np.bincount(parent), np.full(s.n_spots, 4))
    # each sub-spot lies in its parent's cell, a quarter pitch from the centre on both axes
    d_um = np.abs(sub.spatial - s.spatial[parent]) * s.um_per_px
    assert np.allclose(d_um, PITCH / 4, atol=0.5)
    summed = np.zeros((s.n_spots, len(GENES)))
    np.add.at(summed, parent, sub.counts.toarray())
    assert np.allclose(summed, s.counts.toarray(), rtol=1e-5)
    emb = sub.embeddings["test-predimg"]
    assert emb.shape == (sub.n_spots, 6) and len(np.unique(emb.round(5), axis=0)) > sub.n_spots // 2
    assert sub.spot_pitch_um == pytest.approx(PITCH / 2, rel=0.02) and sub.meta["subspot"]["factor"] == 2
    # lattice: the sub-cells of the spot at site (n, m) sit on sites 2 (n, m) + {0, 1}^2, no collisions
    from hist_st.lattice import continuous_coords, to_lattice
    from hist_st.lattice.geometry import measure_grid

    assert sub.meta["spot_grid"]["pitch_um"] == pytest.approx(measure_grid(s.spatial, s.um_per_px).pitch_um / 2)
    xy = continuous_coords(sub)
    assert np.abs(xy - np.rint(xy)).max() < 0.1
    lat_sub, lat = to_lattice(xy), to_lattice(continuous_coords(s))
    rel = lat_sub - 2 * lat[parent]
    rel -= rel.min(0)
    assert set(map(tuple, rel)) == {(0, 0), (0, 1), (1, 0), (1, 1)} and len(np.unique(lat_sub, axis=0)) == sub.n_spots
    # supervision groups the tokens by their parent spot, and the targets are the measured spots
    d = coarse_slide_data(sub, GENES, "test-predimg", 2)
    assert torch.equal(d.groups, torch.from_numpy(parent))
    assert torch.allclose(d.target, torch.log1p(torch.from_numpy(s.counts.toarray())), atol=1e-5)
    with pytest.raises(InputError, match="supervise=coarse2, not coarse3"):
        coarse_slide_data(sub, GENES, "test-predimg", 3)


def test_training_on_subspots_predicts_at_half_the_pitch(slides):
    from hist_st.train import load_config
    from hist_st.train.loop import train
    from hist_st.train.predict import predict_slide

    _, spot_slides = slides
    subs = [subspot_slide(s, 2) for s in spot_slides]
    cfg = load_config(None, ["model.dim=16", "model.heads=2", "epochs=1", "progress=false", "supervise=coarse2"])
    res = train(cfg, subs)
    assert res.bundle.spot_pitch_um["st"] == pytest.approx(PITCH / 2, rel=0.02)
    pred = predict_slide(res.bundle, subs[0])
    assert pred.predicted.shape == (subs[0].n_spots, len(res.bundle.genes))


def test_subspots_need_a_square_grid_and_an_image(slides, tmp_path):
    image, (s, _) = slides
    with pytest.raises(InputError, match="square spot grid"):
        subspot_slide(_square_slide(image, "hex", 0, lattice="hex"), 2)
    with pytest.raises(InputError, match="factor"):
        subspot_slide(s, 1)


def test_bench_subspot_on_a_synthetic_cohort(slides, tmp_path):
    from hist_st.experiments.accuracy import CVSetup
    from hist_st.experiments.superres import run_subspot
    from hist_st.slide import write_prepared

    image, spot_slides = slides
    cohort = tmp_path / "cohort"
    for s in [*spot_slides, _square_slide(image, "s2", 2)]:
        write_prepared(s, cohort / f"{s.slide_id}.h5ad")
    setup = CVSetup(genes="he:5", folds=3, overrides=["model.dim=16", "model.heads=2", "epochs=1", "threads=1"],
                    progress=False)
    res = run_subspot(cohort, tmp_path / "out", setup=setup)
    assert set(res["scores"]) == {"spot", "subspot_summed"} and res["sub_pitch_um"] == pytest.approx(PITCH / 2, rel=0.02)
    for s in res["scores"].values():
        assert -1 <= s["per_gene"]["pcc"]["mean"] <= 1
    assert (tmp_path / "out" / res["figure"]).stat().st_size > 5000
    assert (tmp_path / "out" / "subspot_fold0.json").is_file() and (tmp_path / "out" / "subspots" / "s0.h5ad").is_file()
    again = run_subspot(cohort, tmp_path / "out", setup=setup)
    assert res["cached"] == [] and again["scores"] == res["scores"]
    assert {"fold_0/spot", "fold_0/subspot2", "subspots/s0.h5ad"} <= set(again["cached"])
    with pytest.raises(InputError, match="--fold"):
        run_subspot(cohort, tmp_path / "out", setup=setup, fold=5)
