"""`hist-st prepare` end to end: synthetic her2st-layout cohort, resume, cache, failures; real her2st."""

from __future__ import annotations

import gzip
import json
import time

import numpy as np
import pytest
import torch

from hist_st.cli import main
from hist_st.encoders import Encoder, register_encoder
from hist_st.errors import InputError
from hist_st.prepare import prepare_cohort
from hist_st.slide import read_prepared
from hist_st.sources import sources_from_her2st

SMALL = dict(patch_px=32, patch_um_per_px=3.5, thumbnail_size=64, progress=False, log=None)
TINY = dict(SMALL, encoder="test-tiny")


@register_encoder("test-tiny")
def _tiny(weights=None, device=None) -> Encoder:
    """A fixed random 8-d encoder that keeps the pipeline tests fast (the real one runs in one test)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 4, 4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    return Encoder("test-tiny", model, 8, 32, weights_id="seed0")


def _section(root, section, genes, image=True, seed=0, n_x=5, n_y=4, px=40.0):
    """A her2st-layout section (counts, spot file, and an RGB image: ``True``/``"png"`` by Pillow, ``"tif"`` by
    tifffile, ``False`` none; spots ``px`` apart). Returns the image path or None."""
    rng = np.random.default_rng(seed)
    (root / "ST-cnts").mkdir(parents=True, exist_ok=True)
    (root / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
    rows, sel = [], ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    for x in range(1, 1 + n_x):
        for y in range(1, 1 + n_y):
            sel.append(f"{x}\t{y}\t{x}\t{y}\t{x * px:.2f}\t{y * px:.2f}\t1")
            rows.append(f"{x}x{y}\t" + "\t".join(str(v) for v in rng.poisson(4, len(genes))))
    (root / "ST-spotfiles" / f"{section}_selection.tsv").write_text("\n".join(sel) + "\n")
    with gzip.open(root / "ST-cnts" / f"{section}.tsv.gz", "wt") as fh:
        fh.write("\t" + "\t".join(genes) + "\n" + "\n".join(rows) + "\n")
    if not image:
        return None
    folder = root / "ST-imgs" / section[0] / section
    folder.mkdir(parents=True, exist_ok=True)
    img = rng.integers(100, 230, size=(int((n_y + 1) * px), int((n_x + 1) * px), 3), dtype=np.uint8)
    if image == "tif":
        import tifffile

        tifffile.imwrite(folder / "he.tif", img, photometric="rgb")
        return folder / "he.tif"
    from PIL import Image

    Image.fromarray(img).save(folder / "he.png")
    return folder / "he.png"


@pytest.fixture()
def cohort(tmp_path):
    root = tmp_path / "raw"
    _section(root, "A1", ["GRCh38_G1", "G2", "G3", "G4", "G5"], seed=1)
    _section(root, "A2", ["G1", "G2", "G3", "G4", "G6"], seed=2)
    _section(root, "B1", ["G1", "G2", "G3", "G4"], seed=3, image=False)
    return root


def test_prepare_default_encoder(cohort, tmp_path):
    rep = prepare_cohort(sources_from_her2st(cohort, ["A1"]), tmp_path / "prep", **SMALL)
    assert rep.prepared == ["A1"], rep.failed
    s = read_prepared(tmp_path / "prep" / "A1.h5ad")
    assert s.embeddings["efficientnet-lite0"].shape == (20, 1280)
    assert np.isfinite(s.embeddings["efficientnet-lite0"]).all()


def test_prepare_resume_cache(cohort, tmp_path):
    out = tmp_path / "prep"
    rep = prepare_cohort(sources_from_her2st(cohort), out, allow_missing_image=True, **TINY)
    assert sorted(rep.prepared) == ["A1", "A2"] and rep.skipped_no_image == ["B1"] and not rep.failed
    man = json.loads((out / "cohort.json").read_text())
    assert man["slide_ids"] == ["A1", "A2"]
    assert man["genes"] == ["G1", "G2", "G3", "G4"]  # prefix stripped, shared set
    assert sorted(man["hvg"]) == sorted(man["genes"]) and sorted(man["highly_expressed"]) == sorted(
        man["genes"]
    )
    assert man["embedding_dims"] == {"test-tiny": 8} and man["technology"] == "st"
    assert man["lattice_unit_um"] == 200 and man["skipped"] == {"B1": "no image"}
    s = read_prepared(out / "A1.h5ad")
    assert s.genes.tolist() == ["G1", "G2", "G3", "G4"] and s.n_spots == 20
    assert s.lattice is not None and s.lattice.min() == 0 and s.lattice.max() == 4
    assert s.embeddings["test-tiny"].shape == (20, 8)
    assert s.um_per_px == pytest.approx(5.0) and s.thumbnail.shape[2] == 3
    assert s.patch_outside.dtype == bool and s.patch_outside.sum() == 0
    # resume: nothing redone
    rep2 = prepare_cohort(sources_from_her2st(cohort), out, allow_missing_image=True, **TINY)
    assert rep2.prepared == [] and sorted(rep2.skipped_done) == ["A1", "A2"]
    # a lost slide file is rebuilt from the embedding cache, identical embeddings
    emb = s.embeddings["test-tiny"]
    (out / "A1.h5ad").unlink()
    rep3 = prepare_cohort(sources_from_her2st(cohort), out, allow_missing_image=True, **TINY)
    assert (
        rep3.prepared == ["A1"] and rep3.timings.get("cached_slides") == 1 and "patches" not in rep3.timings
    )
    np.testing.assert_array_equal(read_prepared(out / "A1.h5ad").embeddings["test-tiny"], emb)
    # a corrupt (e.g. foreign or half-copied) slide file is not taken as done
    (out / "A2.h5ad").write_bytes(b"garbage")
    rep4 = prepare_cohort(sources_from_her2st(cohort), out, allow_missing_image=True, **TINY)
    assert rep4.prepared == ["A2"] and read_prepared(out / "A2.h5ad").n_spots == 20


def test_slide_without_image_is_refused_unless_allowed(cohort, tmp_path):
    with pytest.raises(InputError, match=r"1 slide\(s\) have no H&E image: B1.*--allow-missing-image"):
        prepare_cohort(sources_from_her2st(cohort), tmp_path / "prep", **TINY)
    assert not (tmp_path / "prep" / "A1.h5ad").exists()  # refused before any work


def test_failing_slide_does_not_corrupt(cohort, tmp_path):
    out = tmp_path / "prep"
    prepare_cohort(sources_from_her2st(cohort, ["A1"]), out, **TINY)
    before = (out / "A1.h5ad").read_bytes()
    img = next((cohort / "ST-imgs" / "A" / "A2").iterdir())
    img.write_bytes(img.read_bytes()[:200])  # truncated image
    rep = prepare_cohort(sources_from_her2st(cohort), out, allow_missing_image=True, **TINY)
    assert "A2" in rep.failed and "he.png" in rep.failed["A2"]
    assert (out / "A1.h5ad").read_bytes() == before
    assert not (out / "A2.h5ad").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((out / "cohort.json").read_text())["slide_ids"] == ["A1"]


def test_cli_prepare(cohort, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "prepare",
            "--format",
            "her2st",
            "--input",
            str(cohort),
            "--out",
            str(out),
            "--patch-px",
            "32",
            "--patch-um-per-px",
            "3.5",
            "--no-progress",
            "--encoder",
            "test-tiny",
            "--sections",
            "A1",
            "A2",
            "--hvg-scope",
            "train-only",
            "--train-slides",
            "A1",
        ]
    )
    assert rc == 0
    assert "prepared 2 slide(s)" in capsys.readouterr().out
    man = json.loads((out / "cohort.json").read_text())
    assert (
        man["hvg_scope"] == "train-only"
        and man["hvg_train_slides"] == ["A1"]
        and len(man["hvg_dataset"]) == 4
    )
    assert main(["prepare", "--format", "her2st", "--input", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_macenko_stain_norm(cohort, tmp_path):
    out = tmp_path / "stain"
    rep = prepare_cohort(sources_from_her2st(cohort, ["A1"]), out, stain_norm="macenko", **TINY)
    assert rep.prepared == ["A1"]
    assert json.loads((out / "cohort.json").read_text())["stain_norm"].startswith("macenko")


@pytest.mark.slow
def test_real_her2st_prepare(her2st_dir, tmp_path):
    t0 = time.perf_counter()
    rep = prepare_cohort(sources_from_her2st(her2st_dir, ["C5"]), tmp_path / "real", progress=False, log=None)
    assert rep.prepared == ["C5"], rep.failed
    s = read_prepared(tmp_path / "real" / "C5.h5ad")
    assert s.n_spots == 181 and s.embeddings["efficientnet-lite0"].shape == (181, 1280)
    assert len(np.unique(s.lattice, axis=0)) == 181
    assert time.perf_counter() - t0 < 120


def test_spots_outside_image_fail_cleanly(tmp_path):
    import anndata as ad
    import scipy.sparse as sp
    from PIL import Image

    from hist_st.sources import source_from_anndata

    a = ad.AnnData(X=sp.csr_matrix(np.ones((4, 2), np.float32)))
    a.var_names = ["A", "B"]
    a.obsm["spatial"] = np.array([[1000.0, 1000], [1100, 1000], [1000, 1100], [1100, 1100]])
    a.write_h5ad(tmp_path / "s.h5ad")
    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(tmp_path / "he.png")
    rep = prepare_cohort(
        [source_from_anndata(tmp_path / "s.h5ad", tmp_path / "he.png", um_per_px=1.0)],
        tmp_path / "out",
        **TINY,
    )
    assert "4 of 4 spot centres lie outside the image" in rep.failed["s"] and "he.png" in rep.failed["s"]
    assert rep.manifest is None and not (tmp_path / "out" / "s.h5ad").exists()


def test_corrupt_embedding_cache_is_rebuilt_with_a_warning(cohort, tmp_path):
    """Issue 11 case 5: a damaged cache file is named, deleted and rebuilt (also with overwrite)."""
    out = tmp_path / "prep"
    prepare_cohort(sources_from_her2st(cohort, ["A1"]), out, **TINY)
    emb = read_prepared(out / "A1.h5ad").embeddings["test-tiny"]
    (cache,) = (out / ".hist_st_cache" / "A1").glob("*.npz")
    for damage in (b"PK\x03\x04 not a zip", cache.read_bytes()[: len(cache.read_bytes()) // 2]):
        cache.write_bytes(damage)
        with pytest.warns(RuntimeWarning, match=f"{cache}: damaged embedding cache"):
            rep = prepare_cohort(sources_from_her2st(cohort, ["A1"]), out, overwrite=True, **TINY)
        assert rep.prepared == ["A1"] and not rep.failed and rep.timings["cache_rebuilt"] == 1
        np.testing.assert_array_equal(read_prepared(out / "A1.h5ad").embeddings["test-tiny"], emb)
        assert cache.is_file()  # the rebuilt cache
    np.savez(cache, emb=emb[:5], outside=np.zeros(5, bool))  # readable, but for another spot set
    with pytest.warns(RuntimeWarning, match="damaged embedding cache"):
        rep = prepare_cohort(sources_from_her2st(cohort, ["A1"]), out, overwrite=True, **TINY)
    assert rep.prepared == ["A1"]


def test_prepare_never_replaces_a_source_file(tmp_path):
    """Issue 11: an input AnnData inside --out with the slide's own name is refused, not overwritten."""
    from hist_st.slide import slide_to_anndata
    from hist_st.sources import SlideSource
    from hist_st.train.toy import toy_slide

    src = toy_slide("s1", 30)
    folder = tmp_path / "data"
    folder.mkdir()
    adata = slide_to_anndata(src)
    del adata.uns["hist_st"]  # a plain AnnData from elsewhere, not written by hist-st
    adata.write_h5ad(folder / "s1.h5ad")
    before = (folder / "s1.h5ad").read_bytes()
    source = SlideSource("s1", load=lambda: src, image=None, stored_patches=folder / "s1.h5ad")
    rep = prepare_cohort([source], folder, **TINY)
    assert "is not a hist-st prepared slide" in rep.failed["s1"] and rep.prepared == []
    assert (folder / "s1.h5ad").read_bytes() == before


@pytest.mark.parametrize("option, value", [("patch_px", 0), ("batch_size", 0), ("patch_um_per_px", float("nan"))])
def test_prepare_options_checked_before_anything_is_created(cohort, tmp_path, option, value):
    with pytest.raises(InputError, match="must be a positive number"):
        prepare_cohort(sources_from_her2st(cohort, ["A1"]), tmp_path / "prep", **{**TINY, option: value})
    assert not (tmp_path / "prep").exists()


def test_rerun_removes_temporaries_of_an_interrupted_run(cohort, tmp_path):
    """A kill -9 mid-write leaves ``.<slide>.h5ad.<pid>-<token>-<random>.tmp``; the next run removes it even
    when the slide itself is already done."""
    out = tmp_path / "prep"
    prepare_cohort(sources_from_her2st(cohort, ["A1"]), out, **TINY)
    stale = [out / ".A1.h5ad.abcd1234.tmp", out / f".A1.h5ad.{2**22 + 7}-0badc0de-zz99zz99.tmp"]
    for p in stale:
        p.write_bytes(b"half a slide")
    rep = prepare_cohort(sources_from_her2st(cohort, ["A1"]), out, **TINY)
    assert rep.skipped_done == ["A1"] and not any(p.exists() for p in stale)
