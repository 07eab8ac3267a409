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

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hist_st.lattice import LevelIndex, WindowPartition, num_rel_offsets, rel_offset_index

__all__ = ["DualPathAttention", "WindowAttentionFn", "full_heads", "rope_2d"]


def _window_logits(
    q: torch.Tensor, k: torch.Tensor, table: torch.Tensor | None, part: WindowPartition, scale: float
) -> torch.Tensor:
    """Logits ``[H*W, S, S]`` of one partition from gathered ``q, k [H, W, S, Dh]``."""
    h, w, size, dh = q.shape
    if table is None:
        bias = part.mask
    else:  # index_select of the flat offsets: the values of ``table[:, part.rel]`` at a quarter of its time
        bias = table.index_select(1, part.rel.reshape(-1)).view(-1, *part.rel.shape)  # [H, W, S, S]
        bias = bias + part.mask
    bias = bias.to(q.dtype).expand(h, w, size, size).reshape(h * w, size, size)
    return torch.baddbmm(bias, q.reshape(h * w, size, dh), k.reshape(h * w, size, dh).transpose(1, 2), alpha=scale)


def _gather_windows(qkv: torch.Tensor, part: WindowPartition) -> tuple[torch.Tensor, ...]:
    """``qkv [3, H, N, Dh]`` -> q, k, v ``[H, W, S, Dh]`` in the partition's padded window layout, at least
    float32 (bfloat16 is gathered first, then widened: the same values at half the gathered bytes)."""
    three, h, _, dh = qkv.shape
    w, size = part.gather.shape
    windows = qkv.index_select(2, part.gather.reshape(-1)).view(three, h, w, size, dh)
    return windows.to(torch.promote_types(qkv.dtype, torch.float32)).unbind(0)


class _Depth:
    depth = 0


_FULL_HEADS = _Depth()


@contextlib.contextmanager
def full_heads() -> Iterator[None]:
    """Run the local attention path with all heads at once inside this block (see `_head_chunk`)."""
    _FULL_HEADS.depth += 1
    try:
        yield
    finally:
        _FULL_HEADS.depth -= 1


class WindowAttentionFn(torch.autograd.Function):
    """Exact softmax attention over the union of window partitions, flash-attention style.

    Forward computes each partition's un-normalised output, row max and row sum in padded windows and
    merges them with a log-sum-exp. Only ``qkv``, the output and the log-sum-exp are saved (plus the
    dropout keep-masks); backward recomputes the logits. This keeps a training step's memory close
    to that of the token features alone, instead of several ``[H, W, S, S]`` tensors per partition.

    Args (forward):
        qkv: ``[3, H, N, Dh]`` queries, keys, values; bfloat16 is saved as it is and widened to float32
            window by window, so every product, the softmax and the gradients are float32.
        table: ``[H, R]`` additive logit table by relative offset, or None.
        parts: The partitions (standard, then shifted), disjoint per query.
        scale: Logit scale.
        p_drop: Dropout on the attention probabilities.

    Returns:
        ``[H, N, Dh]``, at least float32.
    """

    @staticmethod
    def forward(ctx, qkv, table, parts, scale, p_drop):  # noqa: D102
        h, n = qkv.shape[1], qkv.shape[2]
        outs, maxes, sums, keeps = [], [], [], []
        for part in parts:
            q, k, v = _gather_windows(qkv, part)  # [H, W, S, Dh]
            w, size, dh = q.shape[1], q.shape[2], q.shape[3]
            s = _window_logits(q, k, table, part, scale)
            # A row whose keys are all masked (a query whose shifted-window keys all lie in its standard
            # window) keeps max -inf, so it gets weight exp(-inf - mx) = 0 in the merge below; the
            # standard window always holds the query itself, so mx is finite. Shifting by 0 there only
            # keeps exp(-inf - m) from computing -inf + inf.
            m = s.amax(dim=-1, keepdim=True)
            e = torch.exp(s - torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0))  # one op, not four
            del s
            sums.append(e.sum(dim=-1).view(h, w * size).index_select(1, part.token_flat))
            keep = None
            if p_drop > 0:
                keep = torch.rand_like(e) >= p_drop
                e = e * keep / (1 - p_drop)
            keeps.append(keep)
            o = torch.bmm(e, v.reshape(h * w, size, dh)).view(h, w, size, dh)
            outs.append(o.view(h, w * size, dh).index_select(1, part.token_flat))  # [H, N, Dh]
            maxes.append(m.view(h, w * size).index_select(1, part.token_flat))
            del q, k, v, e, o  # before the next partition's windows are gathered (37 MB at N = 5,000)
        mx = maxes[0] if len(parts) == 1 else torch.maximum(*maxes)
        out = torch.zeros_like(outs[0])
        denom = torch.zeros_like(mx)
        for o, m, row_sum in zip(outs, maxes, sums):
            a = torch.exp(m - mx)
            out += a[..., None] * o
            denom += a * row_sum
        out /= denom[..., None]
        lse = mx + denom.log()  # [H, N]
        ctx.save_for_backward(qkv, table if table is not None else qkv.new_empty(0), out, lse, *[
            kp if kp is not None else qkv.new_empty(0, dtype=torch.bool) for kp in keeps
        ])
        ctx.parts, ctx.scale, ctx.p_drop, ctx.has_table = parts, scale, p_drop, table is not None
        ctx.n = n
        return out

    #: Backward on slides of at least this many tokens goes half of the heads at a time: the gathered windows,
    #: probabilities and their gradients of the other half do not exist meanwhile (heads are independent, so
    #: the gradients are the same bit for bit).
    backward_head_chunk_tokens: int = 2048

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        qkv, table, out, lse, *keeps = ctx.saved_tensors
        table = table if ctx.has_table else None
        scale, p_drop = ctx.scale, ctx.p_drop
        h = qkv.shape[1]
        dout = dout.contiguous()
        delta = (dout * out).sum(-1)  # [H, N]
        # Written whole below (no zero fill), in float32: a bfloat16 qkv's gradient is rounded once at the end
        dqkv = torch.empty_like(qkv, dtype=torch.promote_types(qkv.dtype, torch.float32))
        dtable = torch.zeros_like(table) if table is not None and ctx.needs_input_grad[1] else None
        step = h // 2 if (ctx.n >= WindowAttentionFn.backward_head_chunk_tokens and h % 2 == 0) else h
        for pi, (part, keep) in enumerate(zip(ctx.parts, keeps)):
            valid = (part.index < ctx.n).to(dqkv.dtype)  # [W, S] real query slots
            for i in range(0, h, step):
                hs = slice(i, i + step)
                _window_backward(qkv[:, hs], None if table is None else table[hs], part,
                                 keep.view(h, *part.mask.shape)[hs].flatten(0, 1) if p_drop > 0 else None,
                                 scale, p_drop, lse[hs], dout[hs], delta[hs], valid, dqkv[:, hs],
                                 None if dtable is None else dtable[hs], first=pi == 0)
        return dqkv.to(qkv.dtype), dtable, None, None, None


def _window_backward(
    qkv, table, part, keep, scale, p_drop, lse, dout, delta, valid, dqkv, dtable, first: bool
) -> None:
    """One partition's and one head chunk's share of `WindowAttentionFn.backward`, written (``first``) or
    added into ``dqkv [3, h, N, Dh]``, and added into ``dtable [h, R]`` (views of the whole gradients);
    ``valid`` ``[W, S]``: 1 at the partition's real query slots."""
    flat = part.gather.reshape(-1)
    q, k, v = _gather_windows(qkv, part)  # [h, W, S, Dh]
    h, w, size, dh = q.shape
    s = _window_logits(q, k, table, part, scale)
    p = torch.exp(s - lse.index_select(1, flat).view(h * w, size, 1))  # [h*W, S, S]
    del s
    do = (dout.index_select(1, flat).view(h, w, size, dh) * valid[..., None]).view(h * w, size, dh)
    dp = torch.bmm(do, v.reshape(h * w, size, dh).transpose(1, 2))
    if p_drop > 0:
        pd = p * keep / (1 - p_drop)
        dp = dp * keep / (1 - p_drop)
    else:
        pd = p
    dv = torch.bmm(pd.transpose(1, 2), do)
    ds = p * (dp - (delta.index_select(1, flat).view(h, w, size) * valid).view(h * w, size, 1))
    del p, dp, pd
    dq = torch.bmm(ds, k.reshape(h * w, size, dh)) * scale
    dk = torch.bmm(ds.transpose(1, 2), q.reshape(h * w, size, dh)) * scale
    if dtable is not None:
        dtable.index_add_(1, part.rel.reshape(-1), ds.view(h, -1))
    # Each token sits in exactly one slot of the partition, and the gradients of padding slots are zero (their
    # queries' output gradients are masked by ``valid``, their keys' probabilities are 0): gathering each
    # token's slot gives what a scatter-add of all slots would, without a zero-filled gradient to add into.
    # One [h, N, Dh] gather at a time, written at once: the earlier partition's gradients are not held.
    for j, g in enumerate((dq, dk, dv)):
        tok = g.view(h, w * size, dh).index_select(1, part.token_flat)
        if first:
            dqkv[j].copy_(tok)
        else:
            dqkv[j].add_(tok)


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
        half_window: Window half-size w.
        positional: ``rpb``, ``none``, ``rope`` or ``alibi``.
        attn_dropout: Dropout on attention probabilities.
        impl: ``window``, ``neighbour`` or ``dense``.
        has_tokens: Whether calibration tokens exist (adds the token-update projections).
        mca_proj: ``separate`` (MCA has its own query and token key/value projections) or ``shared``
            (MCA reuses W-MSA's q/k/v).
        n_tokens: Number of calibration tokens; with one, MCA's softmax is 1 and its separate query
            projection would be unused, so it is not created.
        token_update: ``attn`` (paper: residual attention only) or ``block`` (authors: plus an output
            projection; the token FFN lives in `hist_st.model.blocks.RefineBlock`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        half_window: int,
        positional: str = "rpb",
        attn_dropout: float = 0.0,
        impl: str = "window",
        has_tokens: bool = True,
        mca_proj: str = "separate",
        token_update: str = "attn",
        n_tokens: int = 2,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.half_window = heads, dim // heads, half_window
        self.scale = self.head_dim**-0.5
        self.positional, self.impl = positional, impl
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        side = num_rel_offsets(half_window)
        if positional == "rpb":
            self.rpb = nn.Parameter(torch.zeros(heads, side * side))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        elif positional == "alibi":
            r = torch.arange(side, dtype=torch.float32) - (2 * half_window - 1)
            dist = (r[:, None] ** 2 + r[None, :] ** 2).sqrt().flatten()  # [side*side]
            self.register_buffer("alibi", -_alibi_slopes(heads)[:, None] * dist[None], persistent=False)
        self.has_tokens = has_tokens
        self.mca_separate = has_tokens and mca_proj == "separate"
        if self.mca_separate:
            self.q_mca = nn.Linear(dim, dim) if n_tokens > 1 else None
            self.kv_mca = nn.Linear(dim, 2 * dim)
        if has_tokens:
            self.q_tok = nn.Linear(dim, dim)
            self.kv_tok = nn.Linear(dim, 2 * dim)
        self.proj_tok = nn.Linear(dim, dim) if has_tokens and token_update == "block" else None

    #: Inference: slides of at least this many tokens run the local path a quarter of the heads at a time.
    head_chunk_tokens: int = 2048

    # ------------------------------------------------------------------ positional table
    def _bias_table(self) -> torch.Tensor | None:
        """``[H, (4w-1)^2]`` additive logit table, or None."""
        if self.positional == "rpb":
            return self.rpb
        if self.positional == "alibi":
            return self.alibi
        return None

    # ------------------------------------------------------------------ local path, padded windows
    def _local_window(self, qkv: torch.Tensor, level: LevelIndex, step: int | None = None) -> torch.Tensor:
        """``qkv [3, H, N, Dh]`` -> ``[N, H, Dh]`` over the union of both partitions, ``step`` heads per call
        (default: all)."""
        parts = (level.standard,) if level.shifted is None else (level.standard, level.shifted)
        p_drop = self.attn_dropout if self.training else 0.0
        table = self._bias_table()
        h, n = qkv.shape[1], qkv.shape[2]
        step = step or h
        if step == h:
            out = self._window_heads(qkv, table, parts, p_drop)
        else:
            out = qkv.new_empty(h, n, qkv.shape[3], dtype=torch.promote_types(qkv.dtype, torch.float32))
            for i in range(0, h, step):
                hs = slice(i, i + step)
                out[hs] = self._window_heads(qkv[:, hs], None if table is None else table[hs], parts, p_drop)
        return out.to(qkv.dtype).transpose(0, 1)  # [N, H, Dh]

    def _window_heads(
        self, qkv: torch.Tensor, table: torch.Tensor | None, parts: tuple[WindowPartition, ...], p_drop: float
    ) -> torch.Tensor:
        """`WindowAttentionFn` on some or all heads: ``qkv [3, h, N, Dh]``, ``table [h, R]`` -> ``[h, N, Dh]``
        (at least float32)."""
        # Float32 under autocast: the hand-written backward mixes the saved log-sum-exp, the recomputed
        # logits and the float32 bias table, so it must not see bfloat16 operands. A bfloat16 qkv goes in as
        # it is (saved at half the size) and is widened window by window.
        dtype = torch.promote_types(qkv.dtype, torch.float32)
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            return WindowAttentionFn.apply(qkv, None if table is None else table.to(dtype), parts, self.scale,
                                           p_drop)

    def _head_chunk(self, n: int) -> int:
        """Heads per chunk of the local path on slides of ``head_chunk_tokens`` or more without autograd
        (heads are independent): in eval mode a quarter of them (a half when H is not a multiple of 4), each
        with its own q, k, v projection; in training mode (MC dropout) a half of them over the whole
        projection, as before the quarters existed, so the attention dropout draws the same masks; all of
        them with autograd, on smaller slides, and inside `full_heads` (a recomputed block's forward, which
        must draw its dropout in the order of its rerun in backward)."""
        h = self.heads
        if torch.is_grad_enabled() or n < self.head_chunk_tokens or _FULL_HEADS.depth:
            return h
        if self.training:
            return h // 2 if h % 2 == 0 else h
        return h // 4 if h % 4 == 0 else (h // 2 if h % 2 == 0 else h)

    def _local_window_by_heads(self, x: torch.Tensor, level: LevelIndex, step: int) -> torch.Tensor:
        """Inference: `_local_window` ``step`` heads at a time, each chunk's q, k, v projected on its own.

        Only ``[N, 3 step Dh]`` of the projection and one chunk's gathered windows exist at once (at
        N = 100,000 and a quarter of the heads: 0.15 GB instead of 0.6 GB of q, k, v). Each output column of a linear layer is the
        same dot product whether it is computed with the other columns or without them, so the result
        equals the whole projection's (`tests/test_attention.py`).

        Returns:
            ``[N, H, Dh]``.
        """
        n, d = x.shape
        h, dh = self.heads, self.head_dim
        parts = (level.standard,) if level.shifted is None else (level.standard, level.shifted)
        table = self._bias_table()
        w, b = self.qkv.weight.view(3, h, dh, d), self.qkv.bias.view(3, h, dh)
        out: torch.Tensor | None = None
        qkv_dtype = x.dtype
        for i in range(0, h, step):
            hs = slice(i, i + step)
            qkv = F.linear(x, w[:, hs].reshape(-1, d), b[:, hs].reshape(-1)).view(n, 3, step, dh)  # [N, 3, h', Dh]
            qkv = qkv.permute(1, 2, 0, 3)  # [3, h', N, Dh], a strided view
            qkv_dtype = qkv.dtype
            if out is None:
                out = x.new_empty(h, n, dh, dtype=torch.promote_types(qkv_dtype, torch.float32))
            out[hs] = self._window_heads(qkv, None if table is None else table[hs], parts, 0.0)
            del qkv
        return out.to(qkv_dtype).transpose(0, 1)  # [N, H, Dh], in the projection's dtype as `_local_window`

    # ------------------------------------------------------------------ local path, neighbour list
    def _local_neighbour(self, qkv: torch.Tensor, level: LevelIndex) -> torch.Tensor:
        parts = [level.standard] + ([level.shifted] if level.shifted is not None else [])
        nbr = torch.cat([p.index[p.token_window] for p in parts], dim=1)  # [N, K]
        mask = torch.cat([p.mask[p.token_window, p.token_slot] for p in parts], dim=1)  # [N, K]
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
        w2 = 2 * self.half_window
        std = torch.div(c, w2, rounding_mode="floor")
        allowed = (std[:, None, :] == std[None, :, :]).all(-1)  # [N, N]
        if shifted:
            sh = torch.div(c + self.half_window, w2, rounding_mode="floor")
            allowed |= (sh[:, None, :] == sh[None, :, :]).all(-1)
        q, k, v = qkv.unbind(1)  # [N, H, Dh]
        s = torch.einsum("qhd,khd->hqk", q * self.scale, k)
        table = self._bias_table()
        if table is not None:
            delta = c[None, :, :] - c[:, None, :]  # [Nq, Nk, 2] key - query
            delta = torch.where(allowed[..., None], delta, torch.zeros_like(delta))
            s = s + table[:, rel_offset_index(delta, self.half_window)]
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
        h = self.heads
        step = self._head_chunk(n)
        if self.impl == "window" and self.positional != "rope" and step < h and not self.training:
            local = self._local_window_by_heads(x, level, step)  # eval: no dropout, the projection by heads too
        else:
            local = self._local_qkv(x, level, step)
        out = local.reshape(n, d)
        update = None
        if tokens is not None:
            out = out + self._calibration(x, tokens)
            update = self._token_update(x, tokens)
            if self.proj_tok is not None:
                update = self.proj_tok(update)
        return self.proj(out), update

    def _local_qkv(self, x: torch.Tensor, level: LevelIndex, step: int | None = None) -> torch.Tensor:
        """The local path from the whole q, k, v projection (window attention ``step`` heads per call):
        ``[N, H, Dh]``."""
        n, d = x.shape
        h, dh = self.heads, self.head_dim
        qkv = self.qkv(x).view(n, 3, h, dh)
        if self.positional == "rope":
            q, k, v = qkv.unbind(1)
            qkv = torch.stack([rope_2d(q, level.coords), rope_2d(k, level.coords), v], dim=1)
        if self.impl == "window":
            # A strided view [3, H, N, Dh]: the windows are gathered from it directly, so no permuted copy
            # of qkv ([N, 3d], 30 MB at N = 5,000) is made, and backward keeps the linear's output itself.
            local = self._local_window(qkv.permute(1, 2, 0, 3), level, step)
        elif self.impl == "neighbour":
            local = self._local_neighbour(qkv, level)
        else:
            local = self._local_dense(qkv, level, shifted=level.shifted is not None)
        return local

    def _mca_query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """MCA's query weight ``[d, d]`` and bias ``[d]``."""
        d = self.heads * self.head_dim
        if self.mca_separate:
            if self.q_mca is None:
                raise RuntimeError("DualPathAttention was built for one calibration token (n_tokens=1)")
            return self.q_mca.weight, self.q_mca.bias
        return self.qkv.weight[:d], self.qkv.bias[:d]

    def _calibration(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """MCA: ``Attn(X Wq, Cb Wk, Cb Wv)`` with its own softmax over the T tokens, no positional term.

        The logits ``(x Wq_h + bq_h) . k_h = x . (Wq_h^T k_h) + bq_h . k_h`` are computed without forming
        the queries, so nothing of size N is saved beyond ``x``. With one token the softmax is 1.
        """
        n, d = x.shape
        h, dh = self.heads, self.head_dim
        kv = self.kv_mca if self.mca_separate else self.qkv  # token keys/values: [T, 2 or 3, H, Dh]
        tk, tv = kv(tokens).view(tokens.shape[0], -1, h, dh).unbind(1)[-2:]  # [T, H, Dh] each
        if tokens.shape[0] == 1:
            return tv.reshape(1, d).expand(n, d)
        wq, bq = self._mca_query()
        wq, bq = wq.view(h, dh, d), bq.view(h, dh)
        tk = tk * self.scale
        u = torch.einsum("thc,hcd->thd", tk, wq)  # [T, H, d]
        s = torch.einsum("nd,thd->nht", x, u) + torch.einsum("thc,hc->ht", tk, bq)  # [N, H, T]
        return torch.einsum("nht,thd->nhd", torch.softmax(s, dim=-1), tv).reshape(n, d)

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
        # Plain (b)mm instead of einsum: the same products with a third of the dispatched operations, which
        # is what a small slide's step costs (`hist-st bench host`).
        # The keys [X; Cb] are never concatenated: a copy of X [N, d] would be kept for backward.
        u = torch.bmm(q.transpose(0, 1), wk).reshape(h * t, d)  # [H*T, d]
        const = (q * bk).sum(-1).t().reshape(h * t, 1)  # [H*T, 1]
        s = torch.cat([torch.addmm(const, u, x.t()), torch.addmm(const, u, tokens.t())], dim=1)  # [H*T, N + T]
        p = torch.softmax(s, dim=-1)
        n = x.shape[0]
        pooled = torch.addmm(torch.mm(p[:, n:], tokens), p[:, :n], x).view(h, t, d)  # [H, T, d]
        return torch.baddbmm(bv[:, None, :], pooled, wv.transpose(1, 2)).transpose(0, 1).reshape(t, d)
