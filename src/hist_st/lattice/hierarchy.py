"""The dyadic hierarchy: each site (i, j) of level l has the parent (i // 2, j // 2) at level l + 1.

Children sit in canonical slot order (0,0), (0,1), (1,0), (1,1): ``slot = 2 * (i % 2) + (j % 2)``.
Coarsening scatters children into a ``[N_parent, 4, d]`` buffer through (parent, slot); uncoarsening
gathers ``z[parent, slot]`` back, so only children present at the finer level are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Coarsening", "coarsen"]


@dataclass(frozen=True)
class Coarsening:
    """Index maps between a level and its dyadic parent level.

    Attributes:
        parent: ``[N_fine]`` int64 index of each fine token's parent in the coarse level.
        slot: ``[N_fine]`` int64 child slot 0..3 of each fine token under its parent.
        coarse_coords: ``[N_coarse, 2]`` int64 parent sites, sorted lexicographically.
        children: ``[N_coarse, 4]`` int64 fine token in each slot, -1 where the child is absent.
    """

    parent: torch.Tensor
    slot: torch.Tensor
    coarse_coords: torch.Tensor
    children: torch.Tensor

    def to(self, device: torch.device | str) -> Coarsening:
        return Coarsening(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def coarsen(coords: torch.Tensor) -> Coarsening:
    """Dyadic parents of ``coords [N, 2]`` (non-negative int64)."""
    half = torch.div(coords, 2, rounding_mode="floor")
    coarse, parent = torch.unique(half, dim=0, return_inverse=True)
    slot = 2 * (coords[:, 0] % 2) + (coords[:, 1] % 2)
    children = torch.full((coarse.shape[0], 4), -1, dtype=torch.long, device=coords.device)
    children[parent, slot] = torch.arange(coords.shape[0], device=coords.device)
    return Coarsening(parent=parent, slot=slot, coarse_coords=coarse, children=children)
