"""Synthetic spatial-transcriptomics cohorts: the built-in default data of hist-st.

A fair benchmark, not tuned to flatter any method. Every slide is generated from a seed (same seed,
identical arrays) and shares cohort-level biology (gene programs, domain signatures, the histology
"encoder") derived from ``cohort_seed``.

Generative model (per slide):

- **Tissue**: an irregular outline (thresholded smooth random field under a soft radial envelope)
  minus a few elliptical holes, sampled on a hexagonal Visium-like lattice (100 um pitch) or a square
  legacy-ST lattice (200 um pitch). The tissue scale is solved so the slide has ``n_spots`` within ~5%.
- **Latent state** of each spot, at three scales:
  discrete tissue *domains* (argmax of ``n_domains`` smooth fields with ``domain_scale_um`` length
  scale; each domain has a cohort-level signature), long-range *gradients* (two smooth fields at the
  scale of the whole tissue) and *local* spot-level noise (iid per spot).
- **Expression**: ``log mu[i, g] = b[g] + dom[i] @ P_dom[:, g] + grad[i] @ P_grad[:, g]
  + loc[i] @ P_loc[:, g] + patient[g] + log(library size of the slide)``; gene baselines ``b`` span
  low to high expression and loadings are drawn independently of them (so highly variable and highly
  expressed genes differ); counts are negative binomial (gamma-Poisson, gene-specific dispersion).
- **Embeddings**: a fixed random MLP (``tanh``) of the spot's *own* latent state only: its domain
  signature, its local gradient value (weakly) and half of its local-noise dimensions (the other half
  is transcriptional noise invisible in morphology), never of its neighbours. Then a slide-specific
  acquisition shift (per-dimension affine scale and offset, as stain/scanner batch effects) and
  per-spot noise.

So a per-spot regression on embeddings recovers part of the signal, spatial context (smooth domains and
gradients, denoising across neighbours) recovers more, and the slide shift is what a per-slide
calibration can undo. Nothing here is tuned towards any method.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hist_st.cohort import CohortManifest
from hist_st.harmonise import rank_highly_expressed, rank_hvg
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.slide import Slide, write_prepared

__all__ = ["GRIDS", "CohortParams", "cohort_params", "make_slide", "make_cohort", "ENCODER"]

#: Encoder name under which synthetic embeddings are stored (``obsm['X_synthetic']``).
ENCODER = "synthetic"

#: Lattice geometry per grid kind: technology, spot pitch (um), microns per pixel, lattice unit (um).
GRIDS: dict[str, dict[str, Any]] = {
    "hex": {"technology": "visium", "spot_pitch_um": 100.0, "um_per_px": 0.5, "lattice_unit_um": 55.0},
    "square": {"technology": "st", "spot_pitch_um": 200.0, "um_per_px": 1.0, "lattice_unit_um": 200.0},
}

_K_DOM = 8  # domain signature dimension
_K_GRAD = 2  # long-range gradient fields
_K_LOC = 6  # local (spot-level) noise dimensions; the first half is visible in the embeddings
_HIDDEN = 128  # hidden width of the embedding MLP


@dataclass(frozen=True)
class CohortParams:
    """Cohort-level biology shared by every slide generated with the same ``cohort_seed``.

    Attributes:
        genes: Gene names ``[G]``.
        baseline: Log-mean baseline per gene ``[G]``.
        dispersion: Negative-binomial shape (inverse overdispersion) per gene ``[G]``.
        domain_sig: Domain signatures ``[n_domains, K_DOM]``.
        p_dom: Domain-signature loadings ``[K_DOM, G]``.
        p_grad: Gradient loadings ``[K_GRAD, G]``.
        p_loc: Local-noise loadings ``[K_LOC, G]``.
        w1: Embedding MLP input weights ``[K_DOM + K_GRAD + K_LOC // 2, HIDDEN]``.
        c1: Embedding MLP bias ``[HIDDEN]``.
        w2: Embedding MLP output weights ``[HIDDEN, C]``.
    """

    genes: np.ndarray
    baseline: np.ndarray
    dispersion: np.ndarray
    domain_sig: np.ndarray
    p_dom: np.ndarray
    p_grad: np.ndarray
    p_loc: np.ndarray
    w1: np.ndarray
    c1: np.ndarray
    w2: np.ndarray


def cohort_params(
    cohort_seed: int = 0, n_genes: int = 200, embed_dim: int = 64, n_domains: int = 5
) -> CohortParams:
    """Draw the cohort-level biology (deterministic in its arguments).

    Args:
        cohort_seed: Seed of the cohort-level draws.
        n_genes: Number of genes G.
        embed_dim: Embedding dimension C.
        n_domains: Number of tissue domains.

    Returns:
        The `CohortParams`.
    """
    if n_genes < 1 or embed_dim < 1 or n_domains < 1:
        raise ValueError("n_genes, embed_dim and n_domains must be positive")
    rng = np.random.default_rng([int(cohort_seed), 0xC0407])
    g = n_genes
    # Baselines from ~0.02 to ~50 mean counts per spot; loadings independent of the baseline, with a
    # "housekeeping" third of the genes barely varying (high-expressed != highly variable).
    baseline = rng.uniform(np.log(0.02), np.log(50.0), size=g)
    spread = rng.lognormal(mean=np.log(0.35), sigma=0.5, size=g)
    spread[rng.random(g) < 1 / 3] *= 0.15
    domain_sig = rng.normal(size=(n_domains, _K_DOM))
    p_dom = rng.normal(size=(_K_DOM, g)) * spread / np.sqrt(_K_DOM) * 1.6
    p_grad = rng.normal(size=(_K_GRAD, g)) * spread * 0.6
    p_loc = rng.normal(size=(_K_LOC, g)) * spread / np.sqrt(_K_LOC) * 1.0
    p_loc[0] = 0.25  # local depth / cell density: a shared log-scale shift for every gene
    dispersion = rng.uniform(2.0, 12.0, size=g)
    k_in = _K_DOM + _K_GRAD + _K_LOC // 2
    w1 = rng.normal(size=(k_in, _HIDDEN)) * (1.5 / np.sqrt(k_in))
    w1[_K_DOM : _K_DOM + _K_GRAD] *= 0.5  # the local gradient value is only weakly visible
    c1 = rng.normal(size=_HIDDEN) * 0.5
    w2 = rng.normal(size=(_HIDDEN, embed_dim)) / np.sqrt(_HIDDEN)
    width = max(4, len(str(g - 1)))
    genes = np.array([f"SYN{j:0{width}d}" for j in range(g)], dtype=object)
    return CohortParams(genes, baseline, dispersion, domain_sig, p_dom, p_grad, p_loc, w1, c1, w2)


def _fourier_field(
    rng: np.random.Generator, xy: np.ndarray, n_fields: int, length: float, n_features: int = 96
) -> np.ndarray:
    """Smooth Gaussian random fields (random Fourier features of an RBF kernel) at points ``xy``.

    Args:
        rng: Random generator (consumed).
        xy: Points ``[N, 2]``.
        n_fields: Number of independent fields F.
        length: Length scale in the units of ``xy``.
        n_features: Fourier features K (shared by the fields).

    Returns:
        Fields ``[N, F]`` float64 with roughly unit variance.
    """
    w = rng.normal(size=(2, n_features)) / length  # [2, K]
    b = rng.uniform(0, 2 * np.pi, size=n_features)  # [K]
    a = rng.normal(size=(n_features, n_fields)) * np.sqrt(2.0 / n_features)  # [K, F]
    return np.cos(xy @ w + b) @ a  # [N, F]


def _lattice(grid: str, half_extent: float, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice sites covering ``[-half_extent, half_extent]^2``.

    Returns:
        Positions ``[M, 2]`` (x, y) in um and array coordinates ``[M, 2]`` (row, col) int64; for the
        hexagonal grid ``col`` has the parity of ``row`` (Visium convention).
    """
    if grid == "square":
        n = int(np.ceil(half_extent / pitch))
        r, c = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
        xy = np.stack([c.ravel() * pitch, r.ravel() * pitch], axis=1).astype(np.float64)
    else:
        dy = pitch * np.sqrt(3.0) / 2.0
        nr = int(np.ceil(half_extent / dy))
        nc = int(np.ceil(half_extent / (pitch / 2.0)))
        r, c = np.meshgrid(np.arange(-nr, nr + 1), np.arange(-nc, nc + 1), indexing="ij")
        keep = (r - c) % 2 == 0
        r, c = r[keep], c[keep]
        xy = np.stack([c * (pitch / 2.0), r * dy], axis=1).astype(np.float64)
    rc = np.stack([r.ravel(), c.ravel()], axis=1).astype(np.int64)
    return xy, rc


class _Shape:
    """Irregular tissue outline in normalised units (tissue roughly within the unit disc)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.w = rng.normal(size=(2, 64)) / rng.uniform(0.25, 0.4)
        self.b = rng.uniform(0, 2 * np.pi, size=64)
        self.a = rng.normal(size=64) * np.sqrt(2.0 / 64)
        self.aspect = rng.uniform(0.6, 1.0)
        self.theta = rng.uniform(0, np.pi)
        grid = np.stack(np.meshgrid(np.linspace(-1.3, 1.3, 96), np.linspace(-1.3, 1.3, 96)), -1).reshape(
            -1, 2
        )
        score = self._score(grid)
        self.threshold = float(np.quantile(score, 1.0 - 0.4))  # ~40% of the bounding box is tissue
        inside = grid[score > self.threshold]
        n_holes = int(rng.integers(2, 5))
        self.hole_c = inside[rng.choice(len(inside), size=n_holes, replace=False)]
        self.hole_r = rng.uniform(0.05, 0.11, size=(n_holes, 2))
        self.hole_t = rng.uniform(0, np.pi, size=n_holes)

    def _score(self, u: np.ndarray) -> np.ndarray:
        c, s = np.cos(self.theta), np.sin(self.theta)
        v = u @ np.array([[c, -s], [s, c]])
        r2 = v[:, 0] ** 2 + (v[:, 1] / self.aspect) ** 2
        return 0.6 * np.cos(u @ self.w + self.b) @ self.a + (1.0 - r2)

    def inside(self, u: np.ndarray, min_hole: float) -> np.ndarray:
        """Tissue mask at normalised points ``u [M, 2]``; holes have radii of at least ``min_hole``."""
        mask = self._score(u) > self.threshold
        for cen, rad, t in zip(self.hole_c, self.hole_r, self.hole_t):
            rad = np.maximum(rad, min_hole)
            d = u - cen
            c, s = np.cos(t), np.sin(t)
            e = ((d[:, 0] * c + d[:, 1] * s) / rad[0]) ** 2 + ((-d[:, 0] * s + d[:, 1] * c) / rad[1]) ** 2
            mask &= e > 1.0
        return mask


def _place_spots(
    rng: np.random.Generator, grid: str, n_spots: int, pitch: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sample the tissue outline on the lattice with about ``n_spots`` spots (within ~5%)."""
    shape = _Shape(rng)
    cell_area = pitch * pitch * (np.sqrt(3.0) / 2.0 if grid == "hex" else 1.0)
    scale = np.sqrt(n_spots * cell_area / (0.4 * 2.6 * 2.6))  # um per normalised unit, first guess
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(8):
        xy, rc = _lattice(grid, 1.35 * scale, pitch)
        keep = shape.inside(xy / scale, min_hole=1.6 * pitch / scale)
        got = int(keep.sum())
        err = abs(got - n_spots) / n_spots
        if best is None or err < best[0]:
            best = (err, xy[keep], rc[keep])
        if err <= 0.03 or got == 0:
            if got:
                break
            scale *= 2.0
            continue
        scale *= np.sqrt(n_spots / got)
    assert best is not None
    if best[1].shape[0] == 0:
        raise RuntimeError("synthetic tissue outline produced no spots")
    return best[1], best[2]


def make_slide(
    slide_id: str,
    n_spots: int = 2000,
    grid: str = "hex",
    seed: int = 0,
    n_genes: int = 200,
    embed_dim: int = 64,
    patient: str | None = None,
    *,
    cohort_seed: int = 0,
    n_domains: int = 5,
    domain_scale_um: float = 600.0,
    local_noise: float = 0.6,
    embed_noise: float = 0.5,
    acquisition_shift: float = 0.5,
    params: CohortParams | None = None,
) -> Slide:
    """Generate one synthetic slide (deterministic in its arguments).

    Args:
        slide_id: Slide identifier (also prefixes the barcodes).
        n_spots: Target number of spots (hit within ~5%); hundreds to 100,000+.
        grid: ``"hex"`` (Visium-like, 100 um pitch) or ``"square"`` (legacy ST, 200 um pitch).
        seed: Seed of the slide-level draws (outline, domains, gradients, noise, acquisition shift).
        n_genes: Number of genes G.
        embed_dim: Embedding dimension C.
        patient: Patient id (patient-level expression offsets are seeded by it); defaults to ``slide_id``.
        cohort_seed: Seed of the shared biology (`cohort_params`).
        n_domains: Number of tissue domains.
        domain_scale_um: Length scale of the domain fields (um).
        local_noise: Standard deviation of the spot-level latent noise.
        embed_noise: Standard deviation of the per-spot embedding noise (embeddings have ~unit scale).
        acquisition_shift: Strength of the slide-level affine embedding shift.
        params: Precomputed `cohort_params` (must match ``n_genes``/``embed_dim``/``n_domains``).

    Returns:
        A validated `Slide` with counts ``[N, G]`` (CSR float32, integer valued), ``spatial`` ``[N, 2]``
        pixel coordinates (>= 0), ``array_coords`` ``[N, 2]``, ``embeddings["synthetic"]`` ``[N, C]``
        float32, ``lattice`` (when `hist_st.lattice` provides it) and the generator parameters plus
        per-domain spot counts in ``meta``.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {grid!r}")
    if n_spots < 10:
        raise ValueError(f"n_spots must be at least 10, got {n_spots}")
    geo = GRIDS[grid]
    if params is None:
        params = cohort_params(cohort_seed, n_genes, embed_dim, n_domains)
    if params.w2.shape[1] != embed_dim or len(params.genes) != n_genes or len(params.domain_sig) != n_domains:
        raise ValueError("params do not match n_genes / embed_dim / n_domains")
    patient = patient if patient is not None else slide_id
    ss = np.random.SeedSequence([int(seed), zlib.crc32(slide_id.encode())])
    r_geo, r_dom, r_grad, r_loc, r_cnt, r_emb = (np.random.default_rng(s) for s in ss.spawn(6))
    pitch = float(geo["spot_pitch_um"])

    # Geometry: spot centres (um) and array coordinates.
    xy_um, rc = _place_spots(r_geo, grid, int(n_spots), pitch)  # [N, 2], [N, 2]
    n = xy_um.shape[0]
    extent = float(np.ptp(xy_um, axis=0).max())

    # Latent state: domains (meso), gradients (macro), local noise (micro).
    dom_fields = _fourier_field(r_dom, xy_um, n_domains, domain_scale_um)  # [N, D]
    dom_fields += r_dom.normal(size=n_domains) * 0.3  # slide-specific domain proportions
    domain = dom_fields.argmax(axis=1)  # [N]
    dom = params.domain_sig[domain]  # [N, K_DOM]
    grad = _fourier_field(r_grad, xy_um, _K_GRAD, 0.6 * extent + pitch, n_features=32)  # [N, K_GRAD]
    grad = (grad - grad.mean(0)) / (grad.std(0) + 1e-9)
    loc = r_loc.normal(size=(n, _K_LOC)) * local_noise  # [N, K_LOC]

    # Expression: negative-binomial counts around the latent log-mean.
    prng = np.random.default_rng([int(cohort_seed), zlib.crc32(str(patient).encode()), 0xFA7])
    patient_off = prng.normal(size=n_genes) * 0.1  # [G]
    log_lib = r_cnt.normal() * 0.3  # per-slide library size factor
    log_mu = params.baseline + dom @ params.p_dom + grad @ params.p_grad + loc @ params.p_loc
    log_mu += patient_off + log_lib  # [N, G]
    mu = np.exp(np.minimum(log_mu, 12.0))
    theta = params.dispersion  # [G]
    lam = r_cnt.gamma(shape=theta, scale=mu / theta)  # [N, G]
    counts = sp.csr_matrix(r_cnt.poisson(lam).astype(np.float32))

    # Embeddings: MLP of the spot's own state, slide acquisition shift, per-spot noise.
    state = np.concatenate([dom, grad, loc[:, : _K_LOC // 2] / max(local_noise, 1e-6)], axis=1)
    emb = np.tanh(state @ params.w1 + params.c1) @ params.w2  # [N, C]
    scale = np.exp(r_emb.normal(size=embed_dim) * 0.3 * acquisition_shift)  # [C]
    offset = r_emb.normal(size=embed_dim) * acquisition_shift  # [C]
    emb = emb * scale + offset + r_emb.normal(size=emb.shape) * embed_noise
    emb = emb.astype(np.float32)

    # Pixel coordinates: non-negative, one pitch of margin.
    um_per_px = float(geo["um_per_px"])
    spatial = (xy_um - xy_um.min(axis=0) + pitch) / um_per_px
    rc = rc - rc.min(axis=0)
    if grid == "hex" and rc[0].sum() % 2:  # keep Visium's parity convention: col = row (mod 2)
        rc[:, 1] += 1
    barcodes = np.array([f"{slide_id}:{r}x{c}" for r, c in rc], dtype=object)

    slide = Slide(
        slide_id=slide_id,
        spatial=spatial,
        barcodes=barcodes,
        genes=params.genes.copy(),
        counts=counts,
        array_coords=rc,
        embeddings={ENCODER: emb},
        um_per_px=um_per_px,
        spot_pitch_um=pitch,
        lattice_unit_um=float(geo["lattice_unit_um"]),
        technology=str(geo["technology"]),
        patient=str(patient),
        meta={
            "generator": "hist_st.data.synthetic",
            "seed": int(seed),
            "cohort_seed": int(cohort_seed),
            "grid": grid,
            "n_domains": int(n_domains),
            "domain_counts": np.bincount(domain, minlength=n_domains).tolist(),
            "domain_scale_um": float(domain_scale_um),
            "local_noise": float(local_noise),
            "embed_noise": float(embed_noise),
            "acquisition_shift": float(acquisition_shift),
        },
    )
    slide.lattice = to_lattice(continuous_coords(slide))
    return slide.validate()


def make_cohort(
    out_dir: str | Path,
    n_slides: int = 8,
    n_spots: int | Sequence[int] = (300, 1500),
    n_genes: int = 200,
    embed_dim: int = 64,
    seed: int = 0,
    grid: str = "mix",
    slides_per_patient: int = 2,
    **slide_kwargs: Any,
) -> Path:
    """Write a synthetic cohort: one prepared ``<slide_id>.h5ad`` per slide plus ``cohort.json``.

    Args:
        out_dir: Output folder (created).
        n_slides: Number of slides.
        n_spots: Target spots per slide: an int, or a ``(lo, hi)`` range drawn uniformly per slide.
        n_genes: Number of genes G.
        embed_dim: Embedding dimension C.
        seed: Cohort seed (shared biology and every slide's seed derive from it).
        grid: ``"hex"``, ``"square"`` or ``"mix"`` (alternating hex / square by slide).
        slides_per_patient: Consecutive slides sharing a patient id.
        **slide_kwargs: Passed to `make_slide` (``n_domains``, ``local_noise``, ``embed_noise``, ...).

    Returns:
        The path of ``cohort.json``. Keys: ``slides`` (list of ``{slide_id, patient, technology, grid,
        n_spots, file, lattice_unit_um, spot_pitch_um}``), ``slide_ids``, ``patients`` (slide id ->
        patient), ``technology`` (slide id -> technology), ``genes``, ``hvg`` (all genes ranked by
        normalised dispersion, scanpy ``seurat`` flavour over all slides), ``highly_expressed`` (ranked
        by mean raw count), ``encoders`` (``["synthetic"]``), ``embedding_dims``, ``lattice_unit_um``
        (slide id -> um), ``seed`` and ``generator`` parameters.
    """
    if grid not in ("hex", "square", "mix"):
        raise ValueError(f"grid must be 'hex', 'square' or 'mix', got {grid!r}")
    if n_slides < 1:
        raise ValueError("n_slides must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 0x5EED])
    if isinstance(n_spots, int | np.integer):
        sizes = [int(n_spots)] * n_slides
    else:
        lo, hi = (int(v) for v in n_spots)
        sizes = rng.integers(lo, hi + 1, size=n_slides).tolist()
    slide_seeds = rng.integers(0, 2**31 - 1, size=n_slides).tolist()
    n_domains = int(slide_kwargs.pop("n_domains", 5))
    params = cohort_params(seed, n_genes, embed_dim, n_domains)
    width = max(2, len(str(n_slides - 1)))
    entries, counts = [], []
    for i in range(n_slides):
        g = grid if grid != "mix" else ("hex" if i % 2 == 0 else "square")
        sid = f"syn{i:0{width}d}"
        patient = f"P{i // max(1, slides_per_patient)}"
        slide = make_slide(
            sid, sizes[i], g, slide_seeds[i], n_genes, embed_dim, patient,
            cohort_seed=seed, n_domains=n_domains, params=params, **slide_kwargs,
        )
        write_prepared(slide, out / f"{sid}.h5ad")
        counts.append(slide.counts)
        entries.append(
            {
                "slide_id": sid,
                "patient": patient,
                "technology": slide.technology,
                "grid": g,
                "n_spots": slide.n_spots,
                "file": f"{sid}.h5ad",
                "lattice_unit_um": slide.lattice_unit_um,
                "spot_pitch_um": slide.spot_pitch_um,
            }
        )
    hvg, high = rank_hvg(counts, params.genes), rank_highly_expressed(counts, params.genes)
    manifest = {
        "format": "hist-st-cohort",
        "version": 1,
        "slides": entries,
        "slide_ids": [e["slide_id"] for e in entries],
        "patients": {e["slide_id"]: e["patient"] for e in entries},
        "technology": {e["slide_id"]: e["technology"] for e in entries},
        "genes": [str(g) for g in params.genes],
        "hvg": hvg,
        "hvg_method": "scanpy highly_variable_genes flavor='seurat' on normalize_total(1e4)+log1p, all slides",
        "highly_expressed_method": "mean log1p(normalize_total(1e4)), all slides",
        "highly_expressed": high,
        "encoders": [ENCODER],
        "embedding_dims": {ENCODER: int(embed_dim)},
        "lattice_unit_um": {e["slide_id"]: e["lattice_unit_um"] for e in entries},
        "seed": int(seed),
        "generator": {
            "module": "hist_st.data.synthetic",
            "n_slides": n_slides,
            "n_spots": list(n_spots) if not isinstance(n_spots, int | np.integer) else int(n_spots),
            "n_genes": n_genes,
            "embed_dim": embed_dim,
            "grid": grid,
            "n_domains": n_domains,
            **{k: v for k, v in slide_kwargs.items() if isinstance(v, int | float | str)},
        },
    }
    return CohortManifest.write(out, manifest)
