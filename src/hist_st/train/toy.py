"""Tiny prepared slides for tests and smoke runs (milliseconds to make; not a benchmark).

For realistic synthetic data use `hist_st.data.synthetic.make_cohort`; this module only needs to give
the training code a learnable signal on a handful of small slides, fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hist_st.cohort import CohortManifest
from hist_st.slide import Slide, write_prepared
from hist_st.train.data import rank_genes

__all__ = ["toy_slide", "write_toy_cohort"]


def toy_slide(
    slide_id: str, n_spots: int = 150, n_genes: int = 12, dim: int = 16, seed: int = 0, patient: str | None = None
) -> Slide:
    """A small square-lattice slide whose counts depend smoothly on position and on the embeddings."""
    rng = np.random.default_rng([seed, 7])
    side = int(np.ceil(np.sqrt(n_spots * 1.3)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
    pick = np.sort(rng.choice(len(grid), size=n_spots, replace=False))
    rc = grid[pick]
    pitch_um, um_per_px = 100.0, 0.5
    spatial = (rc[:, ::-1] * pitch_um / um_per_px + 50.0).astype(np.float64)
    shared = np.random.default_rng(1234)  # the same biology on every slide
    w_pos = shared.normal(size=(4, n_genes))
    w_emb = shared.normal(size=(dim, n_genes)) / np.sqrt(dim)
    z = rc / max(1, side)
    basis = np.stack([np.sin(3 * z[:, 0]), np.cos(3 * z[:, 1]), z[:, 0] * z[:, 1], np.ones(len(z))], 1)
    emb = np.tanh(basis @ shared.normal(size=(4, dim))) + 0.3 * rng.normal(size=(n_spots, dim))
    rate = np.exp(0.6 * basis @ w_pos + 0.5 * emb @ w_emb + 0.5)
    counts = rng.poisson(rate).astype(np.float32)
    return Slide(
        slide_id=slide_id,
        spatial=spatial,
        barcodes=np.array([f"{slide_id}_{i}" for i in range(n_spots)], dtype=object),
        genes=np.array([f"G{j:02d}" for j in range(n_genes)], dtype=object),
        counts=sp.csr_matrix(counts),
        array_coords=rc.astype(np.int64),
        embeddings={"toy": emb.astype(np.float32)},
        um_per_px=um_per_px,
        spot_pitch_um=pitch_um,
        lattice_unit_um=pitch_um,
        technology="st",
        patient=patient,
    )


def write_toy_cohort(
    folder: str | Path, n_slides: int = 4, n_spots: int = 150, n_genes: int = 12, dim: int = 16, seed: int = 0,
    slides_per_patient: int = 2,
) -> Path:
    """Write ``n_slides`` toy slides (``toy00.h5ad``...) and a ``cohort.json`` with gene rankings."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(n_slides):
        s = toy_slide(f"toy{i:02d}", n_spots + 10 * i, n_genes, dim, seed + i, patient=f"P{i // slides_per_patient}")
        write_prepared(s, out / f"{s.slide_id}.h5ad")
        slides.append(s)
    manifest = {
        "slide_ids": [s.slide_id for s in slides],
        "patients": {s.slide_id: s.patient for s in slides},
        "genes": [str(g) for g in slides[0].genes],
        "hvg": rank_genes(slides, "hvg"),  # the rankings `hist-st prepare` writes (scanpy HVGs)
        "highly_expressed": rank_genes(slides, "highly_expressed"),
        "encoders": ["toy"],
    }
    CohortManifest.write(out, manifest)
    return out
