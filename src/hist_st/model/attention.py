"""Dual-path attention of the monoscale refinement block (paper section 3.4).

Local path (W-MSA): each token attends, with one softmax, to the union of its standard and shifted
windows, plus a positional term. Global path (MCA): tissue tokens attend to the calibration tokens
with a separate softmax. The two outputs are summed before the shared output projection. The
calibration tokens are refreshed by attending to every tissue token and to themselves.

Three exact implementations of the local path share the same parameters:

- ``window``: padded windows ``[W, H, S, S]`` per partition, merged with a log-sum-exp (default);
- ``neighbour``: a fixed-width neighbour list ``[N, K]`` gathered per token;
- ``dense``: an ``N x N`` masked softmax built from the coordinates alone (reference for tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hist_st.lattice import LevelIndex, WindowPartition, num_rel_offsets, rel_offset_index

__all__ = ["DualPathAttention", "rope_2d"]


def _alibi_slopes(heads: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


def rope_2d(x: torch.Tensor, coords: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    """Rotary position embedding on a 2-D lattice.

    The first half of each head's channels rotates with the row coordinate, the second half with the
    column coordinate, so ``<rope(q, p), rope(k, p')>`` depends only on ``p' - p``.

    Args:
        x: ``[N, H, D]`` queries or keys, D divisible by 4.
        coords: ``[N, 2]`` lattice sites.
        base: Frequency base (lattice offsets are small, so a small base).

    Returns:
        ``[N, H, D]`` rotated tensor.
    """
    d = x.shape[-1] // 2
    freqs = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [d/2]
    out = []
    for axis, part in enumerate(x.split(d, dim=-1)):
        ang = coords[:, axis, None].float() * freqs  # [N, d/2]
        cos, sin = ang.cos()[:, None, :].to(x.dtype), ang.sin()[:, None, :].to(x.dtype)
        a, b = part[..., 0::2], part[..., 1::2]
        out.append(torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2))
    return torch.cat(out, dim=-1)


class DualPathAttention(nn.Module):
    """W-MSA over the standard + shifted window union, MCA to the calibration tokens, token update.

    Args:
        dim: Model width d.
        heads: Number of heads H.
        window: Window half-size w.
        positional: ``rpb``, ``none``, ``rope`` or ``alibi``.
        attn_dropout: Dropout on attention probabilities.
        impl: ``window``, ``neighbour`` or ``dense``.
        has_tokens: Whether calibration tokens exist (adds the token-update projections).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window: int,
        positional: str = "rpb",
        attn_dropout: float = 0.0,
        impl: str = "window",
        has_tokens: bool = True,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.window = heads, dim // heads, window
        self.scale = self.head_dim**-0.5
        self.positional, self.impl = positional, impl
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        side = num_rel_offsets(window)
        if positional == "rpb":
            self.rpb = nn.Parameter(torch.zeros(heads, side * side))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        elif positional == "alibi":
            r = torch.arange(side, dtype=torch.float32) - (2 * window - 1)
            dist = (r[:, None] ** 2 + r[None, :] ** 2).sqrt().flatten()  # [side*side]
            self.register_buffer("alibi", -_alibi_slopes(heads)[:, None] * dist[None], persistent=False)
        self.has_tokens = has_tokens
        if has_tokens:
            self.q_tok = nn.Linear(dim, dim)
            self.kv_tok = nn.Linear(dim, 2 * dim)

    # ------------------------------------------------------------------ positional table
    def _bias_table(self) -> torch.Tensor | None:
        """``[H, (4w-1)^2]`` additive logit table, or None."""
        if self.positional == "rpb":
            return self.rpb
        if self.positional == "alibi":
            return self.alibi
        return None

    # ------------------------------------------------------------------ local path, padded windows
    def _partition(
        self, qkv: torch.Tensor, part: WindowPartition, table: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Un-normalised attention in one partition, read back per token.

        Returns:
            ``o [N, H, Dh]`` (sum of exp-weighted values), ``m [N, H]`` (row max), ``l [N, H]`` (sum of
            exp weights before dropout).
        """
        qkv = torch.cat([qkv, qkv.new_zeros(1, *qkv.shape[1:])])[part.index]  # [W, S, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [W, H, S, Dh] each
        s = torch.matmul(q * self.scale, k.transpose(-1, -2))  # [W, H, S, S]
        if table is not None:
            s = s + table.t()[part.rel].permute(0, 3, 1, 2)
        s = s + part.mask
        m = s.amax(dim=-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with every key masked
        e = torch.exp(s - m)
        l = e.sum(dim=-1)  # [W, H, S]
        if self.training and self.attn_dropout > 0:
            e = F.dropout(e, self.attn_dropout)
        o = torch.matmul(e, v)  # [W, H, S, Dh]
        tw, ts = part.token_window, part.token_slot
        return o[tw, :, ts], m[tw, :, ts, 0], l[tw, :, ts]

    def _local_window(self, qkv: torch.Tensor, level: LevelIndex) -> torch.Tensor:
        table = self._bias_table()
        o1, m1, l1 = self._partition(qkv, level.standard, table)
        if level.shifted is None:
            return o1 / l1[..., None]
        o2, m2, l2 = self._partition(qkv, level.shifted, table)
        mx = torch.maximum(m1, m2)
        a1, a2 = torch.exp(m1 - mx), torch.exp(m2 - mx)
        return (a1[..., None] * o1 + a2[..., None] * o2) / (a1 * l1 + a2 * l2)[..., None]

    # ------------------------------------------------------------------ local path, neighbour list
    def _local_neighbour(self, qkv: torch.Tensor, level: LevelIndex) -> torch.Tensor:
        parts = [level.standard] + ([level.shifted] if level.shifted is not None else [])
        nbr = torch.cat([p.index[p.token_window] for p in parts], dim=1)  # [N, K]
        mask = torch.cat([p.mask[p.token_window, 0, p.token_slot] for p in parts], dim=1)  # [N, K]
        rel = torch.cat([p.rel[p.token_window, p.token_slot] for p in parts], dim=1)  # [N, K]
        q, k, v = qkv.unbind(1)  # [N, H, Dh]
        zero = k.new_zeros(1, *k.shape[1:])
        kg, vg = torch.cat([k, zero])[nbr], torch.cat([v, zero])[nbr]  # [N, K, H, Dh]
        s = torch.einsum("nhd,nkhd->nhk", q * self.scale, kg)
        table = self._bias_table()
        if table is not None:
            s = s + table.t()[rel].transpose(1, 2)
        p = torch.softmax(s + mask[:, None, :], dim=-1)
        if self.training and self.attn_dropout > 0:
            p = F.dropout(p, self.attn_dropout)
        return torch.einsum("nhk,nkhd->nhd", p, vg)

    # ------------------------------------------------------------------ local path, dense reference
    def _local_dense(self, qkv: torch.Tensor, level: LevelIndex, shifted: bool) -> torch.Tensor:
        c = level.coords
        w2 = 2 * self.window
        std = torch.div(c, w2, rounding_mode="floor")
        allowed = (std[:, None, :] == std[None, :, :]).all(-1)  # [N, N]
        if shifted:
            sh = torch.div(c + self.window, w2, rounding_mode="floor")
            allowed |= (sh[:, None, :] == sh[None, :, :]).all(-1)
        q, k, v = qkv.unbind(1)  # [N, H, Dh]
        s = torch.einsum("qhd,khd->hqk", q * self.scale, k)
        table = self._bias_table()
        if table is not None:
            delta = c[None, :, :] - c[:, None, :]  # [Nq, Nk, 2] key - query
            delta = torch.where(allowed[..., None], delta, torch.zeros_like(delta))
            s = s + table[:, rel_offset_index(delta, self.window)]
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if self.training and self.attn_dropout > 0:
            p = F.dropout(p, self.attn_dropout)
        return torch.einsum("hqk,khd->qhd", p, v)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, level: LevelIndex, tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend.

        Args:
            x: ``[N, d]`` normalised tissue tokens of one level.
            level: Indices of that level.
            tokens: ``[T, d]`` normalised calibration tokens, or None.

        Returns:
            ``(out [N, d], token_update [T, d] or None)``; the caller adds both residually.
        """
        n, d = x.shape
        h, dh = self.heads, self.head_dim
        qkv = self.qkv(x).view(n, 3, h, dh)
        q_global = qkv[:, 0]  # MCA has no positional term
        if self.positional == "rope":
            q, k, v = qkv.unbind(1)
            qkv = torch.stack([rope_2d(q, level.coords), rope_2d(k, level.coords), v], dim=1)
        if self.impl == "window":
            local = self._local_window(qkv, level)
        elif self.impl == "neighbour":
            local = self._local_neighbour(qkv, level)
        else:
            local = self._local_dense(qkv, level, shifted=level.shifted is not None)
        out = local.reshape(n, d)
        update = None
        if tokens is not None:
            # MCA: separate softmax over the calibration tokens (no positional term).
            tq, tk, tv = self.qkv(tokens).view(-1, 3, h, dh).unbind(1)  # [T, H, Dh]
            p = torch.softmax(torch.einsum("nhd,thd->nht", q_global * self.scale, tk), dim=-1)
            out = out + torch.einsum("nht,thd->nhd", p, tv).reshape(n, d)
            update = self._token_update(x, tokens)
        return self.proj(out), update

    def _token_update(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``Attn(Cb Wq, [X; Cb] Wk, [X; Cb] Wv)`` folded so it costs O(N d H T), not O(N d^2).

        Scores ``(x Wk_h + b) . q_h = x . (Wk_h^T q_h) + const`` and values
        ``sum_n p_n (x_n Wv_h + b) = (sum_n p_n x_n) Wv_h + b`` (the weights sum to one).
        """
        h, dh = self.heads, self.head_dim
        t, d = tokens.shape
        q = self.q_tok(tokens).view(t, h, dh) * self.scale  # [T, H, Dh]
        wk, wv = self.kv_tok.weight.view(2, h, dh, d).unbind(0)  # [H, Dh, d]
        bk, bv = self.kv_tok.bias.view(2, h, dh).unbind(0)  # [H, Dh]
        u = torch.einsum("thc,hcd->thd", q, wk)  # [T, H, d]
        keys = torch.cat([x, tokens])  # [N + T, d]
        s = torch.einsum("md,thd->thm", keys, u) + (q * bk).sum(-1)[..., None]  # [T, H, N + T]
        p = torch.softmax(s, dim=-1)
        pooled = torch.einsum("thm,md->thd", p, keys)  # [T, H, d]
        return (torch.einsum("thd,hcd->thc", pooled, wv) + bv).reshape(t, d)
