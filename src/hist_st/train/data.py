"""Training data: load prepared slides, pick genes, build augmented lattice batches.

A step is described by a `StepKey` (slide index, epoch, augmentation strength, seed). The strength is
computed from the epoch by the main process (`hist_st.train.augment.schedule_strength`) and travels
inside the key, so DataLoader workers always see the current schedule, and the augmentation of a step
is a pure function of its key (reproducible on resume and across ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from hist_st.cohort import CohortManifest, read_manifest
from hist_st.errors import InputError
from hist_st.harmonise import rank_hest_bench, rank_highly_expressed, rank_hvg
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.slide import Slide, read_cohort_slide
from hist_st.train.augment import augment_coords
from hist_st.train.config import AugmentConfig, GeneConfig

__all__ = [
    "StepKey",
    "SlideData",
    "AugmentedSlides",
    "list_slides",
    "load_slides",
    "read_manifest",
    "rank_genes",
    "select_genes",
    "embedding_key",
    "prepare_slide",
    "epoch_keys",
    "shard_indices",
    "log1p_counts",
    "gene_counts",
]



# ----------------------------------------------------------------------------------------------------
# slides on disk


def list_slides(folder: str | Path, slide_ids: Sequence[str] | None = None) -> list[Path]:
    """Prepared-slide files of ``folder`` sorted by slide id (optionally only ``slide_ids``).

    Raises:
        InputError: Missing folder, no ``.h5ad`` files, or requested ids without a file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "slide folder not found")
    files = {p.stem: p for p in sorted(folder.glob("*.h5ad")) if not p.name.startswith(".")}
    if not files:
        raise InputError(folder, "no prepared slides (*.h5ad) in this folder")
    if slide_ids is None:
        return [files[k] for k in sorted(files)]
    missing = [s for s in slide_ids if s not in files]
    if missing:
        raise InputError(folder, f"no prepared slide file for id(s) {', '.join(missing)}")
    if len(set(slide_ids)) != len(slide_ids):
        raise InputError(folder, "slide id list contains duplicates")
    return [files[k] for k in sorted(slide_ids)]


def load_slides(folder: str | Path, slide_ids: Sequence[str] | None = None) -> list[Slide]:
    """Read (and validate) the prepared slides of ``folder``, sorted by slide id.

    Raises:
        InputError: A file is unreadable or invalid, or is a prediction file (`hist_st.slide.is_prediction`).
    """
    slides = []
    for path in list_slides(folder, slide_ids):
        s = read_cohort_slide(path)
        if s.slide_id != path.stem:
            s.slide_id = path.stem  # the file stem is the id (contract); keep them in step
        slides.append(s)
    return slides


# ----------------------------------------------------------------------------------------------------
# genes


def _shared_genes(slides: Sequence[Slide]) -> list[str]:
    if not slides:
        raise InputError("slides", "no slides given")
    for s in slides:
        if s.counts is None:
            raise InputError(f"slide {s.slide_id!r}", "has no counts (H&E-only); cannot train on it")
    shared = set(map(str, slides[0].genes))
    for s in slides[1:]:
        shared &= set(map(str, s.genes))
    order = [str(g) for g in slides[0].genes if str(g) in shared]
    if not order:
        raise InputError("slides", "the slides share no genes")
    return order


def rank_genes(slides: Sequence[Slide], ranking: str = "hvg") -> list[str]:
    """Rank the genes shared by ``slides``, best first, the same way ``hist-st prepare`` ranks a cohort.

    ``hvg``: scanpy ``highly_variable_genes(flavor="seurat")`` on normalize_total(1e4) + log1p of the
    stacked spots, by normalised dispersion (SPEC 2); ``highly_expressed``: mean normalised log
    expression (`hist_st.harmonise.rank_hvg` / `rank_highly_expressed`).
    """

    genes = _shared_genes(slides)
    mats = [sp.csr_matrix(s.counts)[:, _gene_index(s, genes)] for s in slides]
    if ranking == "hvg":
        return rank_hvg(mats, genes)
    if ranking == "highly_expressed":
        return rank_highly_expressed(mats, genes)
    if ranking == "hest-bench":
        return rank_hest_bench(mats, genes)
    raise InputError("config", f"unknown gene ranking {ranking!r} (use 'hvg', 'highly_expressed' or 'hest-bench')")


def select_genes(
    slides: Sequence[Slide], cfg: GeneConfig, manifest: CohortManifest | None = None
) -> list[str]:
    """Genes to predict for a run trained on ``slides``.

    Order of precedence: an explicit ``cfg.genes`` list; for scope ``dataset`` the manifest's ranking
    (``manifest[cfg.ranking]``), or, without a manifest, the ranking over the given slides; for scope
    ``train-only`` the ranking recomputed on ``slides`` (pass only the training slides).

    Returns:
        Up to ``cfg.n_top`` gene names, all present in every slide.

    Raises:
        InputError: Listed genes missing from a slide; a manifest without the requested ranking.
    """
    shared = set(_shared_genes(slides))
    if cfg.genes:
        missing = [g for g in cfg.genes if g not in shared]
        if missing:
            raise InputError("config", f"genes.genes lists {len(missing)} gene(s) absent from the slides: {missing[:5]}")
        return list(cfg.genes)
    if cfg.scope == "dataset" and manifest is not None:
        ranked = [g for g in manifest.ranking(cfg.ranking) if g in shared]
    else:
        ranked = rank_genes(slides, cfg.ranking)
    if not ranked:
        raise InputError("slides", "no ranked gene is present in every slide")
    return ranked[: cfg.n_top]


def _gene_index(slide: Slide, genes: Sequence[str]) -> np.ndarray:
    pos = {str(g): i for i, g in enumerate(slide.genes)}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise InputError(f"slide {slide.slide_id!r}", f"lacks {len(missing)} selected gene(s), e.g. {missing[:5]}")
    return np.array([pos[g] for g in genes], dtype=np.int64)


def gene_counts(slide: Slide, genes: Sequence[str]) -> sp.csr_matrix:
    """Raw counts of ``genes`` (in that order): CSR ``[N, G]``."""
    if slide.counts is None:
        raise InputError(f"slide {slide.slide_id!r}", "has no counts")
    return sp.csr_matrix(slide.counts)[:, _gene_index(slide, genes)]


def log1p_counts(slide: Slide, genes: Sequence[str]) -> np.ndarray:
    """``log1p`` of the raw counts of ``genes`` (in that order): float32 ``[N, G]``."""
    if slide.counts is None:
        raise InputError(f"slide {slide.slide_id!r}", "has no counts")
    x = sp.csr_matrix(slide.counts)[:, _gene_index(slide, genes)].toarray()
    return np.log1p(x).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# per-slide tensors


def embedding_key(slides: Sequence[Slide], key: str | None) -> str:
    """Resolve the embedding key: ``key`` if every slide has it, else the only one present in all."""
    common = set(slides[0].embeddings)
    for s in slides[1:]:
        common &= set(s.embeddings)
    if key is not None:
        key = key[2:] if key.startswith("X_") else key
        for s in slides:
            if key not in s.embeddings:
                raise InputError(
                    f"slide {s.slide_id!r}",
                    f"has no embedding {key!r} (obsm['X_{key}']); available: {sorted(s.embeddings) or 'none'}",
                )
        return key
    if len(common) == 1:
        return next(iter(common))
    if not common:
        raise InputError("slides", "no embedding (obsm['X_<encoder>']) shared by all slides")
    raise InputError("slides", f"several embeddings present ({sorted(common)}); choose one with embedding=<name>")


@dataclass
class SlideData:
    """One slide ready for training or prediction.

    Attributes:
        slide_id: Slide id.
        xy: Continuous spot coordinates in lattice units ``[N, 2]`` float64.
        features: Embeddings ``[N, C]`` float32 (standardised when the run asks for it).
        target: ``log1p`` counts of the selected genes ``[N, G]`` float32, or None (H&E-only); with
            ``groups``, the coarse spots' ``log1p`` summed counts ``[M, G]``.
        groups: Coarse supervision (`hist_st.train.coarse`): the coarse spot of each token ``[N]`` int64
            (-1: none), or None (each token is its own labelled spot).
    """

    slide_id: str
    xy: np.ndarray
    features: torch.Tensor
    target: torch.Tensor | None
    groups: torch.Tensor | None = None

    @property
    def n_spots(self) -> int:
        return int(self.xy.shape[0])


def prepare_slide(
    slide: Slide,
    genes: Sequence[str] | None,
    embedding: str,
    lattice_unit_um: float | None = None,
    feature_mean: np.ndarray | None = None,
    feature_std: np.ndarray | None = None,
) -> SlideData:
    """Turn a `Slide` into `SlideData` (coordinates in lattice units, features, log1p targets)."""

    if embedding not in slide.embeddings:
        raise InputError(
            f"slide {slide.slide_id!r}",
            f"has no embedding {embedding!r}; available: {sorted(slide.embeddings) or 'none'}",
        )
    feats = np.asarray(slide.embeddings[embedding], dtype=np.float32)
    if feature_mean is not None:
        feats = (feats - feature_mean) / feature_std
    target = None
    if genes is not None and slide.counts is not None:
        target = torch.from_numpy(log1p_counts(slide, genes))
    xy = continuous_coords(slide, lattice_unit_um)
    return SlideData(slide.slide_id, xy, torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)), target)


# ----------------------------------------------------------------------------------------------------
# steps, sharding, augmented batches


@dataclass(frozen=True)
class StepKey:
    """Everything that determines one training step's input: which slide, epoch, strength and seed."""

    index: int
    epoch: int
    strength: float
    seed: int


def shard_indices(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> list[int]:
    """This rank's slide order for ``epoch`` (DistributedSampler-like, deterministic).

    The permutation depends only on ``(seed, epoch)``; it is padded by repeating its head to a multiple
    of ``world`` so every rank takes the same number of steps, and rank ``r`` takes ``perm[r::world]``.
    """
    if n < 1:
        raise InputError("slides", "no training slides")
    if shuffle:
        perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
    else:
        perm = np.arange(n)
    total = -(-n // world) * world
    if total > n:
        perm = np.concatenate([perm, np.resize(perm, total - n)])
    return [int(i) for i in perm[rank:total:world]]


def epoch_keys(
    n: int, epoch: int, seed: int, strength: float, rank: int = 0, world: int = 1, shuffle: bool = True
) -> list[StepKey]:
    """The `StepKey` list of one rank for one epoch."""
    return [StepKey(i, epoch, strength, seed) for i in shard_indices(n, epoch, seed, rank, world, shuffle)]


class AugmentedSlides(torch.utils.data.Dataset):
    """Map-style dataset indexed by `StepKey`: returns the augmented, lattice-mapped batch of a step.

    Args:
        slides: The training slides.
        augment: Augmentation settings.
        make_batch: ``(lattice [M, 2] int64, features [M, C]) -> batch`` (the model's ``make_batch``).
    """

    def __init__(self, slides: Sequence[SlideData], augment: AugmentConfig, make_batch: Callable[..., Any]):
        self.slides = list(slides)
        self.augment = augment
        self.make_batch = make_batch

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, key: StepKey) -> dict[str, Any]:
        s = self.slides[key.index]
        rng = np.random.default_rng([key.seed, key.epoch, key.index, 0xA06])
        xy, keep = augment_coords(s.xy, rng, self.augment, key.strength)
        lat = to_lattice(xy, source=f"slide {s.slide_id!r}")
        keep_t = torch.from_numpy(keep)
        feats = s.features.index_select(0, keep_t)
        target = s.target.index_select(0, keep_t) if s.target is not None else None
        batch = self.make_batch(torch.from_numpy(lat), feats)
        return {"slide_id": s.slide_id, "index": key.index, "batch": batch, "target": target, "n_kept": len(keep)}


class KeySampler(torch.utils.data.Sampler):
    """Yields a precomputed list of `StepKey` (one epoch of one rank)."""

    def __init__(self, keys: Sequence[StepKey]):
        self.keys = list(keys)

    def __iter__(self) -> Iterator[StepKey]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)
