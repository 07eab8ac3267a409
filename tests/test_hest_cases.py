"""HEST-1k samples as HEST writes them: partial patch files, Visium HD bins, Xenium pseudo-spots with NaN
spacing, legacy ST at 110 um, blank and recurring patients, patch files cut at another size; the
HEST-Benchmark gene set and splits.

Every sample folder is written here in HEST's layout (``st/<id>.h5ad``, ``patches/<id>.h5`` with ``img``,
``coords`` = top-left corners, ``barcode`` and the size attributes HEST's patcher stores with ``img``,
``metadata/<id>.json`` with NaN for missing values, optional ``wsis/<id>.tif``).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.io import find_hest_samples, read_hest
from hist_st.io._util import GridWarning
from hist_st.lattice import to_lattice
from hist_st.lattice.geometry import neighbour_adjacency

GENES = ["ACTB", "GAPDH", "ERBB2", "KRT19", "CD74", "EPCAM", "VIM", "PTPRC"]


def grid_um(kind: str, pitch: float, rows: int, cols: int) -> np.ndarray:
    if kind == "hex":
        return np.array([((c + 0.5 * (r % 2)) * pitch, r * pitch * np.sqrt(3) / 2) for r in range(rows) for c in range(cols)])
    return np.array([(c * pitch, r * pitch) for r in range(rows) for c in range(cols)], dtype=np.float64)


def write_sample(
    root,
    sid: str,
    *,
    kind: str = "hex",
    pitch_um: float = 100.0,
    upp: float = 2.0,
    technology: str = "Visium",
    inter_spot_dist: float = 100.0,
    spot_diameter: float = 55.0,
    patient=float("nan"),
    dataset: str = "Dataset A",
    rows: int = 5,
    cols: int = 6,
    with_patch: np.ndarray | None = None,
    patch_src_px: float | None = None,
    corner_src_px: float | None = None,
    attrs: bool = True,
    wsi: bool = False,
    seed: int = 0,
):
    """Write one sample in HEST's layout; returns (spot centres px [N, 2], barcodes [N])."""
    import anndata as ad
    import h5py

    rng = np.random.default_rng(seed)
    um = grid_um(kind, pitch_um, rows, cols) + 150.0
    xy = um / upp
    n = len(xy)
    bcs = np.array([f"{sid}_bc{i:03d}" for i in range(n)], dtype=object)
    for d in ("st", "metadata", "patches", "wsis"):
        (root / d).mkdir(parents=True, exist_ok=True)
    counts = rng.poisson(np.linspace(1, 8, len(GENES)), size=(n, len(GENES))).astype(np.float32)
    a = ad.AnnData(X=sp.csr_matrix(counts))
    a.obs_names = list(bcs)
    a.var_names = GENES
    rc = np.rint((um - um.min(0)) / np.array([pitch_um / (2 if kind == "hex" else 1), pitch_um])).astype(int)
    a.obs["array_row"], a.obs["array_col"] = rc[:, 1], rc[:, 0]
    a.obs["pxl_col_in_fullres"], a.obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
    a.obsm["spatial"] = xy
    a.write_h5ad(root / "st" / f"{sid}.h5ad")
    meta = {
        "id": sid,
        "dataset_title": dataset,
        "pixel_size_um_estimated": upp,
        "inter_spot_dist": inter_spot_dist,
        "spot_diameter": spot_diameter,
        "st_technology": technology,
        "organ": "Breast",
        "patient": patient,
    }
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta))  # NaN stays NaN, as HEST writes it
    src = patch_src_px if patch_src_px is not None else 112.0 / upp
    corner = corner_src_px if corner_src_px is not None else src
    rows_with = np.arange(n) if with_patch is None else np.flatnonzero(with_patch)
    order = rows_with[::-1]  # stored in another order than st/: matched by barcode
    with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
        f["img"] = rng.integers(0, 255, size=(len(order), 224, 224, 3), dtype=np.uint8)
        f["coords"] = (xy[order] - corner // 2).astype(np.int64)  # HEST: int(centre - size // 2)
        f["barcode"] = np.array([[b.encode()] for b in bcs[order]])
        if attrs:
            f["img"].attrs.update(
                {"patch_size_src": int(round(src)), "patch_size_target": 224, "downsample": src / 224, "pixel_size": upp}
            )
    if wsi:
        import tifffile

        h, w = int(xy[:, 1].max() + 200), int(xy[:, 0].max() + 200)
        img = rng.integers(100, 230, size=(h, w, 3), dtype=np.uint8)
        tifffile.imwrite(root / "wsis" / f"{sid}.tif", img, photometric="rgb", tile=(64, 64),
                         resolution=(1e4 / upp, 1e4 / upp), resolutionunit="CENTIMETER")
    return xy, bcs


@pytest.fixture(autouse=True)
def _tiny_encoder():
    import torch

    from hist_st.encoders import ENCODERS, Encoder

    def make(weights=None, device=None):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 16, 16), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
        return Encoder("test-tiny-cases", m, 4, 224, weights_id="seed0")

    ENCODERS["test-tiny-cases"] = make
    yield
    ENCODERS.pop("test-tiny-cases", None)


def prepare(root, out, ids=None):
    from hist_st.prepare import prepare_cohort
    from hist_st.sources import sources_from_hest

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = prepare_cohort(sources_from_hest(root, ids), out, encoder="test-tiny-cases", thumbnail_size=64,
                             progress=False, log=None)
    return rep, [w for w in caught if issubclass(w.category, UserWarning)]


def train_one(cohort, out):
    from hist_st.train import load_bundle, load_config, train

    cfg = load_config(None, ["model.dim=32", "model.heads=4", "progress=false", "genes.n_top=6", "epochs=2"])
    result = train(cfg, cohort, out_dir=out)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    return load_bundle(out / "model.pt")


def legacy_adjacency(slide, unit_um: float) -> float:
    """Neighbour adjacency of the old mapping: spots scaled by a fixed per-technology unit."""
    lat = to_lattice(slide.spatial * slide.um_per_px / unit_um)
    return neighbour_adjacency(slide.spatial, lat, slide.meta["spot_grid"]["pitch_um"] / slide.um_per_px).share


# ------------------------------------------------------------------------------------- 1. partial patches
def test_partial_patch_file_keeps_spots_with_a_patch(tmp_path):
    from hist_st.slide import read_prepared

    keep = np.ones(30, dtype=bool)
    keep[[0, 1, 2, 7, 13, 29]] = False  # HEST skipped these (< 15% tissue)
    xy, bcs = write_sample(tmp_path / "hest", "PART1", with_patch=keep, patient="P1")
    rep, caught = prepare(tmp_path / "hest", tmp_path / "out")
    assert rep.prepared == ["PART1"], rep.failed
    s = read_prepared(tmp_path / "out" / "PART1.h5ad")
    assert s.n_spots == 24 and sorted(map(str, s.barcodes)) == sorted(bcs[keep])
    assert s.meta["spots_without_stored_patch"]["dropped"] == 6
    assert any("6 of 30 spots have no stored patch" in str(w.message) for w in caught)
    assert s.counts.shape == (24, len(GENES)) and s.embeddings["test-tiny-cases"].shape == (24, 4)
    assert s.meta["spot_grid"]["kind"] == "hex" and s.meta["neighbour_adjacency"]["share"] == 1.0
    entry = json.loads((tmp_path / "out" / "cohort.json").read_text())["slides"][0]
    assert entry["grid_kind"] == "hex" and entry["neighbour_adjacency"] == 1.0 and entry["n_spots"] == 24
    bundle = train_one(tmp_path / "out", tmp_path / "run")
    assert bundle.lattice_type == {"visium": "hex"}


# ------------------------------------------------------------------------------------- 2. Visium HD
def test_visium_hd_bins_at_128um_with_spacing_2_in_metadata(tmp_path):
    from hist_st.predict_image import model_grid
    from hist_st.slide import read_prepared

    write_sample(tmp_path / "hest", "HD1", kind="square", pitch_um=128.0, upp=4.0, technology="Visium HD",
                 inter_spot_dist=2.0, spot_diameter=2.0, rows=6, cols=6)
    rep, caught = prepare(tmp_path / "hest", tmp_path / "out")
    assert rep.prepared == ["HD1"], rep.failed
    s = read_prepared(tmp_path / "out" / "HD1.h5ad")
    assert s.technology == "visium-hd"
    assert s.lattice_unit_um == pytest.approx(128.0, rel=1e-3) and s.spot_pitch_um == pytest.approx(128.0, rel=1e-3)
    assert s.meta["spot_grid"]["kind"] == "square" and s.meta["neighbour_adjacency"]["share"] == 1.0
    assert s.meta["grid_check"]["declared_pitch_um"] == 2.0 and not s.meta["grid_check"]["agrees"]
    assert any(w.category is GridWarning and "2 um declared" in str(w.message) for w in caught)
    assert legacy_adjacency(s, 8.0) == 0.0  # the old 8 um unit: bins 16 sites apart
    bundle = train_one(tmp_path / "out", tmp_path / "run")
    assert bundle.spot_pitch_um["visium-hd"] == pytest.approx(128.0, rel=1e-3)
    g = model_grid(bundle)
    assert g["pitch_um"] == pytest.approx(128.0, rel=1e-3) and g["lattice"] == "square"
    assert g["lattice_unit_um"] == pytest.approx(128.0, rel=1e-3)


# ------------------------------------------------------------------------------------- 3. Xenium
def test_xenium_pseudo_spots_with_nan_spacing(tmp_path):
    from hist_st.predict_image import model_grid
    from hist_st.slide import read_prepared

    write_sample(tmp_path / "hest", "XE1", kind="square", pitch_um=100.0, upp=2.0, technology="Xenium",
                 inter_spot_dist=float("nan"), spot_diameter=float("nan"))
    s0 = read_hest(tmp_path / "hest", "XE1")
    assert s0.technology == "xenium" and s0.spot_pitch_um is None and s0.lattice_unit_um is None
    rep, caught = prepare(tmp_path / "hest", tmp_path / "out")
    assert rep.prepared == ["XE1"], rep.failed
    s = read_prepared(tmp_path / "out" / "XE1.h5ad")
    assert s.lattice_unit_um == pytest.approx(100.0, rel=1e-3) and s.meta["spot_grid"]["kind"] == "square"
    assert s.meta["neighbour_adjacency"]["share"] == 1.0
    assert not any(w.category is GridWarning for w in caught)
    bundle = train_one(tmp_path / "out", tmp_path / "run")
    g = model_grid(bundle)  # used to refuse: no lattice type for Xenium
    assert g["lattice"] == "square" and g["pitch_um"] == pytest.approx(100.0, rel=1e-3)


# ------------------------------------------------------------------------------------- 4. legacy ST at 110 um
def test_legacy_st_at_110um(tmp_path):
    from hist_st.slide import read_prepared

    write_sample(tmp_path / "hest", "ST110", kind="square", pitch_um=110.0, upp=1.0, technology="Spatial Transcriptomics",
                 inter_spot_dist=110.0, spot_diameter=55.0, rows=6, cols=6)
    rep, caught = prepare(tmp_path / "hest", tmp_path / "out")
    assert rep.prepared == ["ST110"], rep.failed
    s = read_prepared(tmp_path / "out" / "ST110.h5ad")
    assert s.technology == "st" and s.lattice_unit_um == pytest.approx(110.0, rel=1e-3)
    assert s.meta["neighbour_adjacency"]["share"] == 1.0
    assert legacy_adjacency(s, 200.0) <= 0.6  # the old fixed 200 um unit (0.60 here; all 1.0 when measured)
    # the technology default (200 um) disagrees with a sample declared at 200 um but measured at 110 um
    write_sample(tmp_path / "hest2", "ST110b", kind="square", pitch_um=110.0, upp=1.0,
                 technology="Spatial Transcriptomics", inter_spot_dist=float("nan"), rows=6, cols=6)
    _, caught2 = prepare(tmp_path / "hest2", tmp_path / "out2")
    assert any(w.category is GridWarning and "200 um declared" in str(w.message) for w in caught2)
    train_one(tmp_path / "out", tmp_path / "run")


# ------------------------------------------------------------------------------------- 5. patients
def test_patients_are_dataset_and_patient_and_blanks_are_unknown(tmp_path):
    from hist_st.evaluate import slide_groups
    from hist_st.train.folds import make_folds

    root = tmp_path / "hest"
    write_sample(root, "A1", patient="Patient 1", dataset="Dataset A", rows=3, cols=3)
    write_sample(root, "A2", patient="Patient 1", dataset="Dataset A", rows=3, cols=3)
    write_sample(root, "B1", patient="Patient 1", dataset="Dataset B", rows=3, cols=3)
    write_sample(root, "N1", patient=float("nan"), dataset="Dataset B", rows=3, cols=3)
    write_sample(root, "N2", patient="nan", dataset="Dataset C", rows=3, cols=3)
    samples = {s.sample_id: s.patient for s in find_hest_samples(root)}
    assert samples == {"A1": "Dataset A / Patient 1", "A2": "Dataset A / Patient 1",
                       "B1": "Dataset B / Patient 1", "N1": None, "N2": None}
    slides = [read_hest(root, sid) for sid in samples]
    groups = slide_groups(slides, "patient")
    assert groups == samples
    folds = make_folds(list(samples), 4, seed=0, groups=groups)
    for f in folds:
        assert not ({"A1", "A2"} & set(f["test"]) and {"A1", "A2"} & set(f["train"]))  # same patient together
    unknown = sorted(s for f in folds for s in f.get("unknown_group", []))
    assert unknown == ["N1", "N2"]
    assert all(set(f.get("unknown_group", [])) <= set(f["test"]) for f in folds)


# ------------------------------------------------------------------------------------- 6. stored patch size
def test_stored_patch_field_of_view_is_read_and_checked(tmp_path):
    from hist_st.slide import read_prepared

    # cut at 224 um (112 px at 2 um/px) with no WSI: refused, naming both sizes
    write_sample(tmp_path / "a", "BIG", patch_src_px=112.0)
    rep, _ = prepare(tmp_path / "a", tmp_path / "oa")
    assert "stored patches cover 224.0 um" in rep.failed["BIG"] and "no WSI" in rep.failed["BIG"]
    # same file with a WSI: patches are cut from the WSI instead
    write_sample(tmp_path / "b", "BIG", patch_src_px=112.0, wsi=True)
    rep, _ = prepare(tmp_path / "b", tmp_path / "ob")
    assert rep.prepared == ["BIG"], rep.failed
    s = read_prepared(tmp_path / "ob" / "BIG.h5ad")
    assert "patches_from" not in s.meta and "224.0 um" in s.meta["patches_from_wsi_because"]
    # attributes that disagree with where the corners sit: refused
    write_sample(tmp_path / "c", "ODD", patch_src_px=56.0, corner_src_px=112.0)
    rep, _ = prepare(tmp_path / "c", tmp_path / "oc")
    assert "corners are up to" in rep.failed["ODD"]
    # no size attribute: the field of view comes from the corners (112 um here)
    write_sample(tmp_path / "d", "NOATTR", attrs=False)
    rep, _ = prepare(tmp_path / "d", tmp_path / "od")
    assert rep.prepared == ["NOATTR"], rep.failed
    s = read_prepared(tmp_path / "od" / "NOATTR.h5ad")
    assert s.meta["stored_patches"]["field_um"] == pytest.approx(112.0, abs=2.0) and "coords" in s.meta["stored_patches"]["field_from"]


def test_no_spot_with_a_patch_is_an_error(tmp_path):
    from hist_st.io.hest import read_patch_index

    write_sample(tmp_path / "h", "NONE1", with_patch=np.zeros(30, dtype=bool) | (np.arange(30) < 1))
    idx = read_patch_index(tmp_path / "h" / "patches" / "NONE1.h5")
    assert len(idx.barcodes) == 1 and idx.size_src_px == 56 and idx.pixel_size_um == 2.0
    import h5py

    with h5py.File(tmp_path / "h" / "patches" / "NONE1.h5", "a") as f:
        del f["barcode"]
        f["barcode"] = np.array([[b"other"]])
    rep, _ = prepare(tmp_path / "h", tmp_path / "o")
    assert "none of the 30 spots" in rep.failed["NONE1"]


# ------------------------------------------------------------------------------------- 7. HEST-Benchmark
def _hest_get_k_genes_reference(adatas, k):
    """HEST-Benchmark's get_k_genes(criteria='var') written out with scanpy and pandas, as HEST does."""
    import pandas as pd
    import scanpy as sc

    common = None
    for a in adatas:
        b = a.copy()
        sc.pp.filter_genes(b, min_cells=np.ceil(0.10 * len(b.obs)))
        cur = np.array(b.var_names)
        common = cur if common is None else np.intersect1d(common, cur)
    common = [g for g in common if "BLANK" not in g and "Control" not in g]
    stacked = pd.concat([a[:, common].to_df() for a in adatas])
    st = sc.AnnData(stacked.astype(np.float32))
    sc.pp.filter_genes(st, min_cells=0)
    sc.pp.log1p(st)
    sc.pp.highly_variable_genes(st, n_top_genes=k)
    return st.var_names[st.var["highly_variable"]][:k].tolist()


@pytest.mark.filterwarnings("ignore:Observation names are not unique")  # HEST stacks slides with pd.concat
def test_hest_bench_gene_set_matches_hest_get_k_genes():
    import anndata as ad

    from hist_st.harmonise import rank_hest_bench

    rng = np.random.default_rng(3)
    genes = [f"G{i:03d}" for i in range(120)] + ["BLANK_0001", "NegControlProbe_01", "RARE1"]
    adatas, mats = [], []
    for n in (80, 60, 100):
        lam = rng.gamma(0.8, 2.0, size=len(genes))
        x = rng.poisson(lam * rng.gamma(2.0, 0.5, size=(n, 1)), size=(n, len(genes))).astype(np.float32)
        x[:, -1] = 0
        x[:3, -1] = 5  # detected in < 10% of spots
        x[:, -3:-1] += rng.poisson(20, size=(n, 2))  # very variable probes that must be dropped
        a = ad.AnnData(X=x)
        a.var_names = genes
        adatas.append(a)
        mats.append(sp.csr_matrix(x))
    for k in (10, 50):
        ours = rank_hest_bench(mats, genes, k)
        assert ours == _hest_get_k_genes_reference(adatas, k)
        assert len(ours) == k and not {"BLANK_0001", "NegControlProbe_01", "RARE1"} & set(ours)


def test_hest_bench_splits_folder(tmp_path):
    import pandas as pd

    from hist_st.train.folds import load_folds

    split = tmp_path / "IDC" / "splits"
    split.mkdir(parents=True)
    ids = ["NCBI1", "NCBI2", "TENX1", "TENX2"]
    for i in range(2):
        test = ids[2 * i : 2 * i + 2]
        pd.DataFrame({"sample_id": [s for s in ids if s not in test], "patches_path": "x", "expr_path": "y"}).to_csv(
            split / f"train_{i}.csv", index=False
        )
        pd.DataFrame({"sample_id": test, "patches_path": "x", "expr_path": "y"}).to_csv(split / f"test_{i}.csv", index=False)
    folds = load_folds(tmp_path / "IDC")
    assert [f["test"] for f in folds] == [["NCBI1", "NCBI2"], ["TENX1", "TENX2"]]
    assert [f["train"] for f in folds] == [["TENX1", "TENX2"], ["NCBI1", "NCBI2"]]
    (split / "test_1.csv").unlink()
    with pytest.raises(InputError, match="no matching test split"):
        load_folds(split)


def test_cv_on_hest_samples_by_patient_and_with_hest_bench_protocol(tmp_path):
    """End to end: prepare HEST samples, then CV by (dataset, patient) and on HEST-Benchmark's genes + splits."""
    import pandas as pd

    from hist_st.evaluate import cross_validate
    from hist_st.train import load_config

    root = tmp_path / "hest"
    spec = {"A1": ("Patient 1", "Dataset A"), "A2": ("Patient 1", "Dataset A"), "B1": ("Patient 1", "Dataset B"),
            "N1": (float("nan"), "Dataset B"), "N2": (float("nan"), "Dataset C")}
    for i, (sid, (patient, dataset)) in enumerate(spec.items()):
        write_sample(root, sid, patient=patient, dataset=dataset, rows=3, cols=4, seed=i)
    rep, _ = prepare(root, tmp_path / "cohort")
    assert sorted(rep.prepared) == sorted(spec), rep.failed
    cfg = load_config(None, ["model.dim=16", "model.heads=2", "progress=false", "epochs=1", "genes.n_top=4"])
    res = cross_validate(cfg, tmp_path / "cohort", tmp_path / "cv_patient", k=2, group_by="patient", progress=False)
    saved = json.loads((tmp_path / "cv_patient" / "splits.json").read_text())["folds"]
    assert sorted(s for f in saved for s in f.get("unknown_group", [])) == ["N1", "N2"]
    for f in saved:
        assert {"A1", "A2"} <= set(f["test"]) or not {"A1", "A2"} & set(f["test"])
    assert len(res.folds) == 2
    # HEST-Benchmark protocol: its gene set from cohort.json and its fixed splits folder
    split = tmp_path / "bench" / "splits"
    split.mkdir(parents=True)
    for i, test in enumerate([["A1", "A2", "N1"], ["B1", "N2"]]):
        pd.DataFrame({"sample_id": [s for s in spec if s not in test]}).to_csv(split / f"train_{i}.csv", index=False)
        pd.DataFrame({"sample_id": test}).to_csv(split / f"test_{i}.csv", index=False)
    cfg = load_config(None, ["model.dim=16", "model.heads=2", "progress=false", "epochs=1", "genes.ranking=hest-bench"])
    cross_validate(cfg, tmp_path / "cohort", tmp_path / "cv_bench", folds=tmp_path / "bench", progress=False)
    manifest = json.loads((tmp_path / "cohort" / "cohort.json").read_text())
    genes = (tmp_path / "cv_bench" / "genes.txt").read_text().split()
    assert genes == manifest["hest-bench"] and genes == sorted(genes) and 0 < len(genes) <= 50
    saved = json.loads((tmp_path / "cv_bench" / "splits.json").read_text())["folds"]
    assert [f["test"] for f in saved] == [["A1", "A2", "N1"], ["B1", "N2"]]
