"""Visium as deposited (hires/lowres images only) in; maps that show biology out.

Real data: ``../shared/data/visium-heart`` (a Space Ranger 1.x folder with only the lowres image usable)
and ``../shared/data/her2st``; tests that need them skip with a reason when absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from PIL import Image

from hist_st.encoders import Encoder, register_encoder
from hist_st.errors import InputError
from hist_st.io.spaceranger import read_spaceranger, resolve_image_scale
from hist_st.pl import map_agreement, normalise_counts, plot_genes
from hist_st.slide import Slide, read_prepared, write_prepared
from hist_st.tissue import detect_tissue, grid_phase, grid_points, remove_fiducials
from hist_st.wsi import ArrayImage, open_image

HEART = Path(os.environ.get("HIST_ST_VISIUM_HEART", Path(__file__).resolve().parents[2] / "shared/data/visium-heart"))
HER2ST = Path(os.environ.get("HIST_ST_HER2ST", Path(__file__).resolve().parents[2] / "shared/data/her2st"))
needs_heart = pytest.mark.skipif(not (HEART / "outs").is_dir(), reason=f"real Visium folder absent: {HEART}")
needs_her2st = pytest.mark.skipif(not (HER2ST / "ST-imgs").is_dir(), reason=f"her2st data absent: {HER2ST}")


@register_encoder("test-tiny-visium")
def _tiny(weights=None, device=None) -> Encoder:
    """A fixed random 8-d encoder that keeps the Visium pipeline test fast."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    return Encoder("test-tiny-visium", model, 8, 32, weights_id="seed0")


def test_scaled_image_reads_full_resolution_coordinates(tmp_path):
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (400, 600, 3)).astype(np.uint8)
    small = np.asarray(Image.fromarray(full).resize((150, 100), Image.Resampling.BOX))
    Image.fromarray(small).save(tmp_path / "low.png")
    img = open_image(tmp_path / "low.png", um_per_px=0.5, scale=0.25)
    assert (img.width, img.height) == (600, 400) and img.source_um_per_px == pytest.approx(2.0)
    # a full-resolution region maps onto the small image's pixels
    np.testing.assert_array_equal(img.read_region(40, 20, 10, 5), small[5:10, 10:20])
    thumb, scale = img.thumbnail(1024)
    assert thumb.shape[:2] == (100, 150) and scale == pytest.approx(0.25)  # never enlarged past its pixels


def test_resolve_image_scale_by_size(tmp_path):
    sf = {"tissue_hires_scalef": 0.2, "tissue_lowres_scalef": 0.05}
    xy = np.array([[1000.0, 1200], [8000, 9000], [4000, 3000]])
    for name, size, expect in (("full.png", 10000, 1.0), ("hi.png", 2000, 0.2), ("lo.png", 500, 0.05)):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / name)
        _, scale, how = resolve_image_scale(tmp_path / name, sf, xy, None)
        assert scale == expect, how
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(InputError, match="--image-scale"):
        resolve_image_scale(tmp_path / "tiny.png", sf, xy, None)


def test_normalise_counts_matches_scanpy():
    import scanpy as sc

    x = np.random.default_rng(1).poisson(3.0, (50, 20)).astype(np.float32)
    a = ad.AnnData(x.copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    np.testing.assert_allclose(normalise_counts(x), a.X, rtol=1e-5)
    np.testing.assert_allclose(normalise_counts(sp.csr_matrix(x)), a.X, rtol=1e-5)


def test_maps_remove_library_size():
    """Two genes with opposite patterns scaled by a shared library size: raw maps agree, normalised differ."""
    rng = np.random.default_rng(2)
    n = 400
    lib = rng.lognormal(0, 1.0, n) * 200
    p = rng.uniform(0.3, 0.7, n)
    x = np.column_stack([lib * 0.1 * p, lib * 0.1 * (1 - p), lib * 0.8])
    slide = Slide("s", np.column_stack([np.arange(n) % 20, np.arange(n) // 20]) * 10.0 + 5,
                  np.array([f"b{i}" for i in range(n)], dtype=object), genes=np.array(["A", "B", "C"], dtype=object),
                  counts=sp.csr_matrix(np.round(x).astype(np.float32)), predicted=x.astype(np.float32))
    raw = map_agreement(slide, ["A", "B"], "log1p")["between_genes"]["predicted"][0][1]
    norm = map_agreement(slide, ["A", "B"], "normalised")["between_genes"]["predicted"][0][1]
    assert raw > 0.3 and norm < -0.9


def test_prediction_file_is_scanpy_plottable_without_measured_data(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    rng = np.random.default_rng(3)
    xy, rc = grid_points(500, 400, 50, "square")
    pred = rng.gamma(2.0, 3.0, (len(xy), 4)).astype(np.float32)
    slide = Slide("p", xy, np.array([f"s{i}" for i in range(len(xy))], dtype=object),
                  genes=np.array(list("ABCD"), dtype=object), array_coords=rc, um_per_px=2.0, spot_pitch_um=100.0,
                  technology="he-only", predicted=pred, thumbnail=np.full((400, 500, 3), 230, np.uint8),
                  thumbnail_scale=1.0, meta={"pseudo_spots": {"lattice": "square"}})
    path = write_prepared(slide, tmp_path / "p.h5ad")
    a = ad.read_h5ad(path)
    assert a.uns["hist_st"]["kind"] == "prediction" and a.uns["hist_st"]["grid"] == "square"
    np.testing.assert_allclose(np.asarray(a.X), pred)  # not zeros: sc.pl.spatial(color=gene) plots predictions
    deg = np.asarray(a.obsp["spatial_connectivities"].sum(1)).ravel()
    assert deg.max() == 4 and set(np.unique(deg)) <= {2, 3, 4}  # a square grid has 4 neighbours, not 6
    sc.pl.spatial(a, color="A", show=False)
    back = read_prepared(path)
    assert back.is_prediction and back.counts is None and np.allclose(back.predicted, pred)
    out = plot_genes(path, ["A", "D"], tmp_path / "maps.png")  # no measured data needed
    assert out.stat().st_size > 1000
    with pytest.raises(InputError, match="not among the slide's 4 genes"):
        plot_genes(path, ["NOPE"], tmp_path / "x.png")


@pytest.mark.parametrize("lattice,angle", [("hex", 0.0), ("hex", 7.0), ("square", -4.0)])
def test_grid_phase_puts_pseudo_spots_on_reference_spots(lattice, angle):
    from scipy.spatial import cKDTree

    xy, _ = grid_points(3000, 2000, 100.0, lattice, origin=(137.0, 61.0), angle_deg=angle)
    ref = xy[300:700] + np.random.default_rng(4).normal(0, 1.5, xy[300:700].shape)  # a part of the grid
    origin, got = grid_phase(ref, 100.0, lattice)
    assert got == pytest.approx(angle, abs=0.5)
    ps, _ = grid_points(3000, 2000, 100.0, lattice, origin=origin, angle_deg=got)
    inner = ref[(ref > 10).all(1) & (ref[:, 0] < 2990) & (ref[:, 1] < 1990)]  # grid points exist inside only
    d, _ = cKDTree(ps).query(inner)
    assert np.median(d) < 3.0 and d.max() < 8.0
    assert len(ps) == pytest.approx(len(xy), rel=0.02)  # the rotated grid still covers the whole image


def test_grid_points_neighbours_are_grid_steps():
    """Array coordinates of a rotated grid: the graph's neighbours are exactly the points one pitch apart."""
    from scipy.spatial import cKDTree

    from hist_st.slide import neighbour_graph

    for lattice in ("hex", "square"):
        xy, rc = grid_points(900, 700, 50.0, lattice, angle_deg=12.0)
        s = Slide("g", xy, np.arange(len(xy)).astype(str).astype(object), array_coords=rc,
                  meta={"pseudo_spots": {"lattice": lattice}})
        conn, _, _ = neighbour_graph(s)
        pairs = cKDTree(xy).query_pairs(50.0 * 1.05, output_type="ndarray")
        brute = {(int(i), int(j)) for i, j in pairs} | {(int(j), int(i)) for i, j in pairs}
        assert set(zip(*conn.nonzero(), strict=True)) == brute


def test_fiducial_dots_are_removed_tissue_kept():
    mask = np.zeros((300, 300), bool)
    mask[80:220, 80:220] = True  # tissue
    yy, xx = np.mgrid[:300, :300]
    for c in range(20, 281, 12):  # a frame of round dots, radius 3, 12 px apart
        for cy, cx in ((20, c), (280, c), (c, 20), (c, 280)):
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
    out, n = remove_fiducials(mask)
    assert n >= 80 and out[80:220, 80:220].all() and not out[:60].any() and not out[:, 250:].any()


def test_noise_and_photographs_are_refused():
    rng = np.random.default_rng(5)
    with pytest.raises(InputError, match="no tissue-like structure"):
        detect_tissue(ArrayImage(rng.integers(0, 256, (400, 400, 3)).astype(np.uint8), "noise"))
    from skimage import data

    with pytest.raises(InputError, match="H&E colours"):
        detect_tissue(ArrayImage(data.coffee(), "coffee"))


@needs_heart
def test_prepare_visium_from_lowres_keeps_what_scanpy_reads(tmp_path):
    import scanpy as sc

    from hist_st.prepare import prepare_cohort
    from hist_st.sources import source_from_spaceranger

    outs = HEART / "outs"
    rep = prepare_cohort([source_from_spaceranger(outs, None)], tmp_path / "C", encoder="test-tiny-visium",
                         patch_px=32, progress=False, log=None)
    assert rep.prepared and not rep.failed
    (sid,) = rep.prepared
    assert "enlarged 32.3x" in rep.warnings[sid][0]
    man = json.loads((tmp_path / "C" / "cohort.json").read_text())
    assert man["slides"][0]["patch_upsampling"] == pytest.approx(32.3, abs=0.1) and man["warnings"][sid]
    mine = ad.read_h5ad(tmp_path / "C" / f"{sid}.h5ad")
    ref = sc.read_visium(outs)
    assert list(mine.uns["spatial"]) == list(ref.uns["spatial"])  # the library id
    lib = next(iter(ref.uns["spatial"]))
    assert mine.uns["spatial"][lib]["scalefactors"] == pytest.approx(ref.uns["spatial"][lib]["scalefactors"])
    for key in ("hires", "lowres"):
        theirs = np.round(ref.uns["spatial"][lib]["images"][key][..., :3] * 255).astype(np.uint8)
        np.testing.assert_array_equal(mine.uns["spatial"][lib]["images"][key], theirs)
    common = ref.obs_names.intersection(mine.obs_names)
    assert len(common) == mine.n_obs == ref.n_obs
    np.testing.assert_allclose(mine[common].obsm["spatial"], ref[common].obsm["spatial"])
    for col in ("in_tissue", "array_row", "array_col"):
        np.testing.assert_array_equal(mine[common].obs[col].to_numpy(), ref[common].obs[col].to_numpy())
    assert {"gene_ids", "feature_types", "genome"} <= set(mine.var.columns)
    assert mine.uns["hist_st"]["grid"] == "hex"


@needs_heart
def test_visium_lowres_tissue_detection_skips_the_fiducial_frame():
    from hist_st.bench.tissue import bench_spaceranger

    r = bench_spaceranger(HEART / "outs")
    assert r["recall"] == 1.0 and r["fiducial_dots_removed"] > 300
    side = r["outside_capture_area_by_side"]  # the section overlaps the frame on the left only
    assert side["right"] == side["top"] == side["bottom"] == 0


@needs_her2st
def test_her2st_tissue_detection_recall_and_glass():
    from hist_st.bench.tissue import bench_her2st

    rows = bench_her2st(HER2ST, ["C5"])
    assert rows[0]["recall"] >= 0.97 and rows[0]["glass_called_tissue"] <= 0.03


def test_read_spaceranger_rejects_bad_um_per_px(tmp_path):
    if not (HEART / "outs").is_dir():
        pytest.skip(f"real Visium folder absent: {HEART}")
    with pytest.raises(InputError, match="--um-per-px"):
        read_spaceranger(HEART / "outs", um_per_px=-1.0)


@needs_heart
def test_anndata_from_read_visium_uses_its_images(tmp_path):
    """`--format anndata` on `sc.read_visium` output cuts the same patches from uns['spatial'] as the folder."""
    import scanpy as sc

    from hist_st.prepare import prepare_cohort
    from hist_st.sources import source_from_anndata, source_from_spaceranger

    sc.read_visium(HEART / "outs").write_h5ad(tmp_path / "rv.h5ad")
    kw = dict(encoder="test-tiny-visium", patch_px=32, progress=False, log=None)
    a = prepare_cohort([source_from_anndata(tmp_path / "rv.h5ad", None, slide_id="s")], tmp_path / "A", **kw)
    b = prepare_cohort([source_from_spaceranger(HEART / "outs", None, slide_id="s")], tmp_path / "B", **kw)
    assert a.prepared == b.prepared == ["s"]
    sa, sb = read_prepared(tmp_path / "A" / "s.h5ad"), read_prepared(tmp_path / "B" / "s.h5ad")
    assert sa.meta["image_scale_source"].startswith("uns['spatial']") and "lowres" in sa.meta["image_scale_source"]
    order = [list(sb.barcodes).index(x) for x in sa.barcodes]
    np.testing.assert_allclose(sa.embeddings["test-tiny-visium"], sb.embeddings["test-tiny-visium"][order], atol=1e-5)
