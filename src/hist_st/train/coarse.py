"""Coarse supervision: fine tokens, labels on coarse spots that each cover several of them.

Super-resolution training (issue 13). The model sees tokens at a fine lattice (one patch embedding per
fine site) but the labels are measured on coarser spots. Each fine token belongs to at most one coarse
spot (``groups[i]`` = its coarse spot, ``-1`` = none). The loss turns the fine log1p predictions of a
coarse spot's members into counts, sums them in count space, takes ``log1p`` and compares with the
coarse spot's measured ``log1p`` counts (MSE)::

    loss = mean_{m, g} ( log1p( sum_{i: groups[i] = m} expm1(pred[i, g]) ) - target[m, g] )^2

so the decoder learns fine maps from coarse labels. With one member per coarse spot this is exactly the
ordinary MSE on log1p targets. A negative log1p prediction is a count in (-1, 0), as in the ordinary MSE
(prediction files clip it to 0); the sum is floored just above -1 so ``log1p`` stays finite.

`TrainConfig.supervise` chooses the mode: ``"spot"`` (the ordinary loss) or ``"coarse<k>"`` (``k >= 2``):
each training slide's spots are the fine tokens and every ``k x k`` block of neighbouring lattice sites
(block = ``floor(lattice / k)``) is one coarse spot whose counts are the sum of its spots' counts. That
is the honest evaluation of the issue: labels ``k`` times coarser than the tokens, with the true
fine labels known but never used in training.

```python
from hist_st.train.coarse import block_groups, coarse_transform
groups, n_children = block_groups(lattice, 2)             # [N] int64, [M] int64
transform = coarse_transform(torch.from_numpy(groups), len(n_children))
loss = F.mse_loss(transform(pred_log1p), coarse_log1p)     # pred [N, G] -> [M, G]
```

`transform` is a plain column-wise function of an ``[N, c]`` tensor, so it can be applied to any chunk of
gene columns (a gene-chunked head computes the same loss chunk by chunk).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from hist_st.errors import InputError
from hist_st.io._util import attach_lattice
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.slide import Slide
from hist_st.train.augment import augment_coords, dropout_probability
from hist_st.train.config import SUPERVISE_HELP, block_factor
from hist_st.train.data import AugmentedSlides, SlideData, StepKey, gene_counts, prepare_slide
from hist_st.train.subspot import subspot_groups

__all__ = [
    "SUPERVISE_HELP",
    "block_factor",
    "block_groups",
    "coarse_transform",
    "coarse_loss",
    "coarse_log1p",
    "coarse_head_bias",
    "coarse_slide_data",
    "CoarseAugmentedSlides",
    "coarsen_slide",
    "coarsen_prediction",
    "supervision_record",
]

#: ``log1p`` of a coarse sum is taken at no less than this value above -1 (a sum of negative counts).
_FLOOR = -1.0 + 1e-6


def block_groups(lattice: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k x k`` block each lattice site belongs to.

    Args:
        lattice: Integer lattice sites ``[N, 2]`` (`hist_st.lattice.to_lattice`).
        k: Block side in lattice sites (>= 1).

    Returns:
        ``(groups [N] int64, n_children [M] int64)``: the coarse spot of every site (blocks numbered in
        lexicographic order of ``floor(lattice / k)``) and the number of sites in each coarse spot.
    """
    lat = np.asarray(lattice, dtype=np.int64)
    if lat.ndim != 2 or lat.shape[1] != 2:
        raise InputError("lattice", f"must have shape [N, 2], got {lat.shape}")
    if k < 1:
        raise InputError("block", f"block side must be >= 1, got {k}")
    blocks = np.floor_divide(lat, k)
    _, groups = np.unique(blocks, axis=0, return_inverse=True)
    groups = groups.reshape(-1).astype(np.int64)
    return groups, np.bincount(groups).astype(np.int64)


def coarse_transform(groups: torch.Tensor, n_coarse: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from fine log1p predictions ``[N, c]`` to coarse log1p predictions ``[M, c]``.

    Args:
        groups: int64 ``[N]``: the coarse spot of each fine token, ``-1`` for none.
        n_coarse: ``M``, the number of coarse spots (every id in ``groups`` is below it).

    Returns:
        ``transform(pred [N, c]) -> log1p(sum of expm1(pred) per coarse spot) [M, c]``, column-wise
        (any subset of gene columns can be transformed alone); differentiable.
    """
    groups = torch.as_tensor(groups, dtype=torch.int64)
    if groups.numel() and int(groups.max()) >= n_coarse:
        raise InputError("groups", f"a group id ({int(groups.max())}) is not below the number of coarse spots {n_coarse}")
    member = torch.nonzero(groups >= 0).squeeze(1)  # [N'] fine tokens that belong to a coarse spot
    index = groups.index_select(0, member)  # [N'] their coarse spot

    def transform(pred: torch.Tensor) -> torch.Tensor:
        counts = torch.expm1(pred.index_select(0, member.to(pred.device)))  # [N', c]
        total = pred.new_zeros(n_coarse, pred.shape[1]).index_add(0, index.to(pred.device), counts)  # [M, c]
        return torch.log1p(total.clamp_min(_FLOOR))

    return transform


def coarse_loss(pred: torch.Tensor, groups: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between aggregated fine predictions ``[N, G]`` and coarse log1p targets ``[M, G]``."""
    import torch.nn.functional as F

    return F.mse_loss(coarse_transform(groups, int(target.shape[0]))(pred), target)


def coarse_log1p(counts: sp.spmatrix | np.ndarray, groups: np.ndarray, n_coarse: int) -> np.ndarray:
    """``log1p`` of the counts ``[N, G]`` summed per coarse spot: float32 ``[M, G]`` (rows of group -1 dropped)."""
    member = np.flatnonzero(groups >= 0)
    agg = sp.csr_matrix((np.ones(len(member)), (groups[member], member)), shape=(n_coarse, len(groups)))
    summed = agg @ sp.csr_matrix(counts)
    return np.log1p(summed.toarray()).astype(np.float32)


def coarse_head_bias(target: torch.Tensor, n_children: torch.Tensor) -> torch.Tensor:
    """Head bias for coarse supervision: mean over coarse spots of ``log1p(coarse count / members)`` ``[G]``.

    A fine token's count is about its coarse spot's count divided by the number of members; starting the
    head there starts the aggregated prediction near the coarse mean (the ordinary bias, the mean log1p
    target, would start it ``members`` times too high).

    Args:
        target: Coarse log1p targets ``[M, G]``.
        n_children: Members per coarse spot ``[M]``.
    """
    per_child = torch.expm1(target.double()) / n_children.double().clamp_min(1)[:, None]
    return torch.log1p(per_child).mean(0).float()


def coarse_slide_data(slide: Slide, genes: Sequence[str], embedding: str, k: int) -> SlideData:
    """`SlideData` of a slide supervised on its ``k x k`` blocks of spots.

    Fine tokens are the slide's spots (coordinates and embeddings as `prepare_slide`); ``target`` holds the
    blocks' ``log1p`` summed counts ``[M, G]`` and ``groups`` each spot's block ``[N]``. A sub-spot slide
    (`hist_st.train.subspot.subspot_slide`, ``k x k`` tokens per measured spot) is grouped by its parent spots.
    """

    d = prepare_slide(slide, None, embedding)
    groups = subspot_groups(slide, k)  # sub-spot tokens (`hist_st.train.subspot`): their parent spot
    if groups is None:
        groups, _ = block_groups(to_lattice(d.xy, source=f"slide {slide.slide_id!r}"), k)
    n_coarse = int(groups.max()) + 1
    target = torch.from_numpy(coarse_log1p(gene_counts(slide, genes), groups, n_coarse))
    return dataclasses.replace(d, target=target, groups=torch.from_numpy(groups))


class CoarseAugmentedSlides(AugmentedSlides):
    """`AugmentedSlides` for slides with ``groups``: the same geometry, spot dropout by whole coarse spot.

    Dropping single fine tokens would leave coarse spots with missing members whose labels still count
    them; instead each coarse spot is dropped with the schedule's dropout probability together with all
    its members (fine tokens of no coarse spot are dropped one by one). Items carry ``groups`` (the kept
    tokens' coarse spots renumbered ``0..M'-1``) and ``target`` (the kept coarse spots' targets).
    """

    def __getitem__(self, key: StepKey) -> dict[str, Any]:
        s = self.slides[key.index]
        if s.groups is None:
            return super().__getitem__(key)
        rng = np.random.default_rng([key.seed, key.epoch, key.index, 0xC0A])
        groups = s.groups.numpy()
        n_coarse = int(s.target.shape[0])
        xy, _ = augment_coords(s.xy, rng, dataclasses.replace(self.augment, dropout=0.0), key.strength)
        p = dropout_probability(key.strength, self.augment) if self.augment.enabled else 0.0
        keep_group = np.ones(n_coarse, dtype=bool)
        loose = groups < 0
        keep_loose = np.ones(len(groups), dtype=bool)
        if p > 0:
            keep_group = rng.random(n_coarse) >= p
            keep_loose = rng.random(len(groups)) >= p
            members = max(1.0, float((~loose).sum()) / n_coarse)  # mean members per coarse spot
            min_groups = min(n_coarse, max(1, int(np.ceil(self.augment.min_spots / members))))
            if keep_group.sum() < min_groups:
                keep_group[:] = False
                keep_group[rng.choice(n_coarse, size=min_groups, replace=False)] = True
        keep = np.flatnonzero(np.where(loose, keep_loose, keep_group[np.maximum(groups, 0)]))
        renumber = np.cumsum(keep_group) - 1
        kept_groups = np.where(groups[keep] >= 0, renumber[np.maximum(groups[keep], 0)], -1)
        keep_t = torch.from_numpy(keep)
        lat = to_lattice(xy[keep], source=f"slide {s.slide_id!r}")
        batch = self.make_batch(torch.from_numpy(lat), s.features.index_select(0, keep_t))
        target = s.target.index_select(0, torch.from_numpy(np.flatnonzero(keep_group)))
        return {"slide_id": s.slide_id, "index": key.index, "batch": batch, "target": target,
                "groups": torch.from_numpy(kept_groups.astype(np.int64)), "n_kept": len(keep)}


def coarsen_slide(slide: Slide, k: int, embedding: str | None = None) -> tuple[Slide, np.ndarray]:
    """The slide as its ``k x k`` blocks of spots would have measured it: one coarse spot per block.

    Counts are summed over the block's spots, embeddings averaged, the spot centre is the block's centre
    on the slide's measured grid (an affine fit of image pixels on lattice coordinates), and the coarse
    grid is measured again (`hist_st.io._util.attach_lattice`: pitch ``k`` times the slide's).

    Args:
        slide: A prepared slide with a lattice unit (its measured grid).
        k: Block side in lattice sites.
        embedding: Only this embedding (default: all).

    Returns:
        ``(coarse slide, groups [N])``: ``groups[i]`` is the coarse spot (row of the coarse slide) of spot ``i``.
    """
    import warnings

    xy = continuous_coords(slide)
    lat = to_lattice(xy, source=f"slide {slide.slide_id!r}")
    groups, n_children = block_groups(lat, k)
    m = len(n_children)
    mean = sp.csr_matrix((1.0 / n_children[groups], (groups, np.arange(len(groups)))), shape=(m, len(groups)))
    total = sp.csr_matrix((np.ones(len(groups)), (groups, np.arange(len(groups)))), shape=(m, len(groups)))
    # lattice coordinates -> pixels (affine, least squares); block centres in lattice coordinates
    design = np.c_[xy, np.ones(len(xy))]
    coef, *_ = np.linalg.lstsq(design, np.asarray(slide.spatial, dtype=np.float64), rcond=None)
    blocks = np.floor_divide(lat, k)
    first = np.zeros(m, dtype=np.int64)
    first[groups[::-1]] = np.arange(len(groups))[::-1]
    centre = blocks[first] * k + (k - 1) / 2.0
    spatial = np.c_[centre, np.ones(m)] @ coef
    embs = {n: np.asarray(mean @ np.asarray(v, dtype=np.float64), dtype=np.float32)
            for n, v in slide.embeddings.items() if embedding is None or n == embedding}
    pitch = float(slide.spot_pitch_um) * k if slide.spot_pitch_um else None
    meta = {key: v for key, v in slide.meta.items() if key not in ("spot_grid", "grid_check", "neighbour_adjacency")}
    meta["coarsened"] = {"block": k, "from": slide.slide_id, "fine_pitch_um": slide.spot_pitch_um}
    coarse = slide.on_spots(
        spatial,
        np.array([f"block_{b[0]}_{b[1]}" for b in blocks[first]], dtype=object),
        genes=np.asarray(slide.genes, dtype=object),
        counts=sp.csr_matrix(total @ sp.csr_matrix(slide.counts)).astype(np.float32) if slide.counts is not None else None,
        embeddings=embs,
        spot_pitch_um=pitch,
        lattice_unit_um=pitch,
        meta=meta,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attach_lattice(coarse)
    return coarse, groups


def coarsen_prediction(pred: Slide, k: int) -> Slide:
    """A prediction `Slide` summed over ``k x k`` blocks of its spots (the resolution of coarse labels).

    Predicted counts are summed per block (`coarsen_slide`); the MC std is dropped (the std of a sum needs
    the covariance of the passes, which is not kept). Measured counts, when present, are summed too.
    """
    base = dataclasses.replace(pred, counts=sp.csr_matrix(np.asarray(pred.predicted, dtype=np.float32)),
                               predicted=None, predicted_std=None)
    coarse, groups = coarsen_slide(base, k)
    out = dataclasses.replace(coarse, predicted=np.asarray(coarse.counts.toarray(), dtype=np.float32), counts=None)
    if pred.counts is not None:
        total = sp.csr_matrix((np.ones(len(groups)), (groups, np.arange(len(groups)))), shape=(coarse.n_spots, len(groups)))
        out.counts = sp.csr_matrix(total @ sp.csr_matrix(pred.counts)).astype(np.float32)
    out.meta = dict(out.meta)
    if isinstance(out.meta.get("prediction"), dict):
        out.meta["prediction"] = {**out.meta["prediction"], "summed_over_blocks": k, "mc_samples": 0}
    return out


def supervision_record(config: dict[str, Any] | None, token_pitch_um: float | None) -> dict[str, Any]:
    """What a model was supervised on, relative to its tokens (for prediction files and summaries).

    Args:
        config: The model's training config (`ModelBundle.config`).
        token_pitch_um: Spot pitch of the tokens it was trained on (its training slides' spot pitch).

    Returns:
        ``{"supervise", "block", "token_pitch_um", "label_pitch_um", "note"}``.
    """
    supervise = str((config or {}).get("supervise", "spot"))
    k = block_factor(supervise)
    label = token_pitch_um * k if token_pitch_um else None
    if k == 1:
        note = "trained on labels at its token (spot) pitch: predictions are at the resolution it was supervised on"
    else:
        pitches = f" ({label:g} um pitch) with tokens at the spot pitch ({token_pitch_um:g} um)" if label else ""
        note = (f"trained on labels of {k}x{k} blocks of spots{pitches}: predictions at the spot pitch are {k}x "
                "finer than its labels")
    return {"supervise": supervise, "block": k, "token_pitch_um": token_pitch_um, "label_pitch_um": label, "note": note}
