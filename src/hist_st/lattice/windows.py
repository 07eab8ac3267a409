"""Window partitions of a sparse lattice level, computed once and reused by every block.

A token attends, with one softmax, to the union of the tokens in its standard window (side 2w, origin
0) and in its shifted window (side 2w, shifted by w on both axes), itself included. Each partition is
stored as padded windows ``[W, S]`` (S = largest window occupancy), so attention is a batched dense
product per window. Keys of the shifted window that also lie in the query's standard window are
masked out there, so the two partitions cover the union exactly once and merge with a log-sum-exp.

The shift is an offset of the window origin, never a roll modulo the lattice extent, so the shifted
partition differs from the standard one for every extent (the authors' code made them equal whenever
the extent was a multiple of 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WindowPartition", "window_partition", "rel_offset_index", "num_rel_offsets"]


def num_rel_offsets(half_window: int) -> int:
    """Side of the relative-offset table for half-size ``w``: offsets span ``[-(2w-1), 2w-1]``."""
    return 4 * half_window - 1


def rel_offset_index(delta: torch.Tensor, half_window: int) -> torch.Tensor:
    """Flat index ``[...]`` into a ``(4w-1) x (4w-1)`` table of the lattice offsets ``delta [..., 2]``."""
    side = num_rel_offsets(half_window)
    shift = 2 * half_window - 1
    return (delta[..., 0] + shift) * side + (delta[..., 1] + shift)


@dataclass(frozen=True)
class WindowPartition:
    """One partition of a level's tokens into padded windows.

    Attributes:
        index: ``[W, S]`` int64 token index per window slot; padding slots hold N.
        gather: ``[W, S]`` int64 like ``index`` with padding slots pointing at token 0 (masked keys), so
            features are gathered without appending a padding row.
        token_window: ``[N]`` int64 window of each token.
        token_slot: ``[N]`` int64 slot of each token within its window.
        token_flat: ``[N]`` int64 ``token_window * S + token_slot``, the token's row in ``[W * S]``.
        rel: ``[W, S, S]`` int64 flat relative-offset index (key - query) into the bias table.
        mask: ``[W, S, S]`` float additive mask: 0 where the query may attend the key, -inf elsewhere
            (padding keys; in the shifted partition also keys already in the query's standard window).
    """

    index: torch.Tensor
    gather: torch.Tensor
    token_window: torch.Tensor
    token_slot: torch.Tensor
    token_flat: torch.Tensor
    rel: torch.Tensor
    mask: torch.Tensor

    @property
    def num_windows(self) -> int:
        return int(self.index.shape[0])

    @property
    def size(self) -> int:
        return int(self.index.shape[1])

    def to(self, device: torch.device | str) -> WindowPartition:
        return WindowPartition(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _window_key(coords: torch.Tensor, half_window: int, shift: int) -> torch.Tensor:
    cell = torch.div(coords + shift, 2 * half_window, rounding_mode="floor")  # [N, 2]
    width = int(cell[:, 1].max()) + 1
    return cell[:, 0] * width + cell[:, 1]


def window_partition(
    coords: torch.Tensor, half_window: int, shifted: bool, exclude_key: torch.Tensor | None = None
) -> WindowPartition:
    """Partition lattice tokens into windows of side ``2 * half_window``.

    Args:
        coords: ``[N, 2]`` int64 non-negative lattice sites of one level.
        half_window: Window half-size w.
        shifted: Use the partition whose origin is shifted by ``w`` on both axes.
        exclude_key: ``[N]`` window id of each token in another partition; keys sharing the query's id
            there are masked out (used to make the shifted partition disjoint from the standard one).

    Returns:
        The padded `WindowPartition`.
    """
    n = coords.shape[0]
    key = _window_key(coords, half_window, half_window if shifted else 0)
    uniq, token_window, counts = torch.unique(key, return_inverse=True, return_counts=True)
    num_windows = uniq.shape[0]
    size = int(counts.max())
    order = torch.argsort(token_window, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    token_slot = torch.empty_like(token_window)
    token_slot[order] = torch.arange(n, device=coords.device) - starts[token_window[order]]
    index = torch.full((num_windows, size), n, dtype=torch.long, device=coords.device)
    index[token_window, token_slot] = torch.arange(n, device=coords.device)
    valid = index < n

    padded = torch.cat([coords, coords.new_zeros(1, 2)])[index]  # [W, S, 2]
    delta = padded[:, None, :, :] - padded[:, :, None, :]  # [W, S(q), S(k), 2] key - query
    # Padding *keys* are masked; padding *queries* see real keys so that no row is empty (they are
    # never read back). A real query of the shifted partition may have every key excluded: the
    # attention handles empty rows.
    allowed = valid[:, None, :].expand(num_windows, size, size)
    if exclude_key is not None:
        ek = torch.cat([exclude_key, exclude_key.new_full((1,), -1)])[index]  # [W, S]
        allowed = allowed & (ek[:, None, :] != ek[:, :, None])
    in_table = allowed & valid[:, :, None]  # offsets of real query-key pairs lie within the table
    delta = torch.where(in_table[..., None], delta, torch.zeros_like(delta))
    rel = rel_offset_index(delta, half_window)
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=coords.device)
    mask.masked_fill_(~allowed, float("-inf"))
    return WindowPartition(
        index=index,
        gather=torch.where(valid, index, torch.zeros_like(index)),
        token_window=token_window,
        token_slot=token_slot,
        token_flat=token_window * size + token_slot,
        rel=rel,
        mask=mask,
    )
