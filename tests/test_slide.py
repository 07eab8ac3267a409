"""The prepared-slide contract: round trip, validation, atomic writes, scanpy compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.slide import Slide, read_prepared, write_prepared


def _slide(n: int = 12, g: int = 5) -> Slide:
    rng = np.random.default_rng(0)
    xy = np.stack(np.meshgrid(np.arange(4), np.arange(3), indexing="ij"), -1).reshape(-1, 2)[:n] * 100.0 + 50
    return Slide(
        slide_id="s1",
        spatial=xy.astype(float),
        barcodes=np.array([f"b{i}" for i in range(n)], dtype=object),
        genes=np.array([f"G{j}" for j in range(g)], dtype=object),
        counts=sp.csr_matrix(rng.poisson(2.0, size=(n, g)).astype(np.float32)),
        lattice=(xy // 100).astype(np.int64),
        embeddings={"enc": rng.normal(size=(n, 8)).astype(np.float32)},
        um_per_px=0.5,
        spot_pitch_um=100.0,
        lattice_unit_um=100.0,
        technology="visium",
        patient="P1",
        thumbnail=np.zeros((10, 10, 3), dtype=np.uint8),
        thumbnail_scale=0.05,
        meta={"source": "test"},
    )


def test_round_trip(tmp_path) -> None:
    s = _slide()
    path = write_prepared(s, tmp_path / "s1.h5ad")
    r = read_prepared(path)
    assert r.slide_id == "s1" and r.patient == "P1" and r.technology == "visium"
    np.testing.assert_array_equal(r.counts.toarray(), s.counts.toarray())
    np.testing.assert_array_equal(r.spatial, s.spatial)
    np.testing.assert_array_equal(r.lattice, s.lattice)
    np.testing.assert_array_equal(r.embeddings["enc"], s.embeddings["enc"])
    assert list(r.genes) == list(s.genes) and r.um_per_px == 0.5 and r.meta == {"source": "test"}
    assert r.thumbnail.shape == (10, 10, 3)


def test_prediction_file_keeps_measured_counts(tmp_path) -> None:
    s = _slide()
    s.predicted = np.ones((s.n_spots, s.n_genes), dtype=np.float32)
    r = read_prepared(write_prepared(s, tmp_path / "p.h5ad"))
    np.testing.assert_array_equal(r.counts.toarray(), s.counts.toarray())
    np.testing.assert_array_equal(r.predicted, s.predicted)
    s.counts = None  # H&E-only prediction
    r = read_prepared(write_prepared(s, tmp_path / "q.h5ad"))
    assert r.counts is None and r.predicted.shape == (s.n_spots, s.n_genes)


def _break(kind: str) -> Slide:
    s = _slide()
    if kind == "duplicate":
        s.spatial[1] = s.spatial[0]
    elif kind == "negative":
        s.spatial[2, 0] = -1.0
    elif kind == "nan-coords":
        s.spatial[3, 1] = np.nan
    elif kind == "nan-counts":
        s.counts.data[0] = np.nan
    elif kind == "negative-counts":
        s.counts.data[0] = -2
    elif kind == "zero":
        s.spatial, s.barcodes, s.counts, s.lattice, s.embeddings = np.zeros((0, 2)), np.array([]), None, None, {}
    elif kind == "rows":
        s.embeddings["enc"] = s.embeddings["enc"][:-1]
    return s


@pytest.mark.parametrize(
    "kind, message",
    [
        ("duplicate", "share coordinates"),
        ("negative", "negative"),
        ("nan-coords", "NaN"),
        ("nan-counts", "NaN"),
        ("negative-counts", "negative"),
        ("zero", "zero spots"),
        ("rows", "shape"),
    ],
)
def test_bad_input_is_named(tmp_path, kind: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        write_prepared(_break(kind), tmp_path / "bad.h5ad")
    assert "bad.h5ad" in str(err.value)


def test_failed_write_keeps_existing_file(tmp_path) -> None:
    path = write_prepared(_slide(), tmp_path / "s1.h5ad")
    before = path.read_bytes()
    with pytest.raises(InputError):
        write_prepared(_break("duplicate"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s1.h5ad"]


def test_unreadable_file_is_named(tmp_path) -> None:
    bad = tmp_path / "truncated.h5ad"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="truncated.h5ad"):
        read_prepared(bad)
    with pytest.raises(InputError, match="not found"):
        read_prepared(tmp_path / "missing.h5ad")


def test_scanpy_plots_a_prepared_slide(tmp_path) -> None:
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    adata = ad.read_h5ad(write_prepared(_slide(), tmp_path / "s1.h5ad"))
    sc.pl.spatial(adata, color="G0", show=False, library_id="s1")
