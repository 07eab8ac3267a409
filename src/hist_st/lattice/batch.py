"""`LatticeBatch`: one slide's tokens and every coordinate-only index the model needs.

All indices depend only on the lattice, so they are built once per slide (per augmentation draw),
outside any `nn.Module`, and reused by every block of the encoder and the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hist_st.errors import InputError
from hist_st.lattice.hierarchy import Coarsening, coarsen
from hist_st.lattice.windows import WindowPartition, window_partition

__all__ = ["LevelIndex", "LatticeBatch", "build_batch"]


@dataclass(frozen=True)
class LevelIndex:
    """Indices of one lattice level.

    Attributes:
        coords: ``[N_l, 2]`` int64 lattice sites of the level.
        standard: Standard window partition.
        shifted: Shifted window partition (masked to be disjoint from ``standard``), or None.
        down: Map to the next coarser level, or None at the deepest level.
    """

    coords: torch.Tensor
    standard: WindowPartition
    shifted: WindowPartition | None
    down: Coarsening | None

    @property
    def num_tokens(self) -> int:
        return int(self.coords.shape[0])

    def to(self, device: torch.device | str) -> LevelIndex:
        return LevelIndex(
            self.coords.to(device),
            self.standard.to(device),
            self.shifted.to(device) if self.shifted is not None else None,
            self.down.to(device) if self.down is not None else None,
        )


@dataclass(frozen=True)
class LatticeBatch:
    """One slide: features ``[N, C]`` on lattice sites ``[N, 2]`` and the per-level indices."""

    feats: torch.Tensor
    levels: tuple[LevelIndex, ...]
    half_window: int

    @property
    def coords(self) -> torch.Tensor:
        return self.levels[0].coords

    @property
    def num_tokens(self) -> int:
        return self.levels[0].num_tokens

    def to(self, device: torch.device | str) -> LatticeBatch:
        return LatticeBatch(self.feats.to(device), tuple(lv.to(device) for lv in self.levels), self.half_window)


def build_level(coords: torch.Tensor, half_window: int, shifted: bool) -> LevelIndex:
    """Window partitions of one level (no coarsening map)."""
    standard = window_partition(coords, half_window, shifted=False)
    shifted_part = None
    if shifted:
        shifted_part = window_partition(coords, half_window, shifted=True, exclude_key=standard.token_window)
    return LevelIndex(coords, standard, shifted_part, None)


def build_batch(
    lattice: np.ndarray | torch.Tensor,
    feats: np.ndarray | torch.Tensor,
    num_levels: int,
    half_window: int = 3,
    shifted: bool = True,
) -> LatticeBatch:
    """Build every index for ``num_levels`` dyadic levels of one slide.

    Args:
        lattice: ``[N, 2]`` unique non-negative integer sites (`to_lattice`).
        feats: ``[N, C]`` features of the tokens.
        num_levels: Number of resolutions (1 = full resolution only).
        half_window: Window half-size w (windows of side 2w).
        shifted: Also build the shifted partitions.

    Returns:
        The `LatticeBatch`, on the device of ``feats``.
    """
    feats = torch.as_tensor(feats)
    coords = torch.as_tensor(np.asarray(lattice) if not torch.is_tensor(lattice) else lattice, dtype=torch.long)
    coords = coords.to(feats.device)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise InputError("lattice", f"expected [N, 2] sites with N > 0, got {tuple(coords.shape)}")
    if feats.ndim != 2 or feats.shape[0] != coords.shape[0]:
        raise InputError("features", f"expected [{coords.shape[0]}, C] features, got {tuple(feats.shape)}")
    if (coords < 0).any():
        raise InputError("lattice", "lattice sites must be non-negative")
    flat = coords[:, 0] * (coords[:, 1].max() + 1) + coords[:, 1]  # one int64 key per site (1-D unique is fast)
    if torch.unique(flat).shape[0] != coords.shape[0]:
        raise InputError("lattice", "lattice sites must be unique (use hist_st.lattice.to_lattice)")
    levels: list[LevelIndex] = []
    for level in range(num_levels):
        lv = build_level(coords, half_window, shifted)
        if level < num_levels - 1:
            down = coarsen(coords)
            lv = LevelIndex(lv.coords, lv.standard, lv.shifted, down)
            coords = down.coarse_coords
        levels.append(lv)
    return LatticeBatch(feats=feats, levels=tuple(levels), half_window=half_window)
