"""Building blocks: the monoscale refinement block and the dyadic transition operators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hist_st.lattice import Coarsening, LevelIndex
from hist_st.model.attention import DualPathAttention, full_heads

__all__ = ["RefineBlock", "RecomputedFFN", "RecomputedBlock", "Coarsen", "Uncoarsen"]


class RecomputedFFN(torch.autograd.Function):
    """``fc2(act(fc1(LayerNorm(x))))`` that saves only ``x``: backward recomputes the norm and the hidden layer.

    Autograd would keep the normalised input ``[N, d]`` and the hidden layer ``[N, 4d]`` of every block
    (at N = 5,000 and d = 512, 51 MB per block); this keeps only the block input, which the residual
    stream holds anyway. The price is one more ``fc1`` product in backward (1/6 of the FFN's training
    FLOPs), not the whole FFN that `torch.utils.checkpoint` would rerun. Backward goes ``chunk`` tokens at
    a time (the FFN acts on each token alone), so its hidden-layer gradients are ``[chunk, 4d]``, not
    ``[N, 4d]`` (three of those, 120 MB at N = 5,000, at the start of a plain FFN's backward).
    On slides of more than ``chunk`` tokens the weight gradients are sums over chunks, so they equal
    the plain FFN's to rounding (``assert_close``), not bit for bit, as with any recompute option.

    Args (forward):
        x: ``[N, d]`` block input (before the norm).
        norm: The ``LayerNorm(d)``.
        fc1, fc2: The FFN's linear layers.
        act: The activation module.
        chunk: Tokens per backward chunk.
        *params: ``norm``'s, ``fc1``'s and ``fc2``'s parameters (so autograd tracks them).
    """

    @staticmethod
    def forward(ctx, x, norm, fc1, fc2, act, chunk, *params):  # noqa: D102
        ctx.mods = (norm, fc1, fc2, act)
        ctx.chunk = max(1, int(chunk))
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, *params)
        h = act(fc1(norm(x)))
        return fc2(h)

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        x, *params = ctx.saved_tensors
        norm, fc1, fc2, act = ctx.mods
        dout = dout.contiguous()
        dev, enabled, dtype = ctx.autocast
        w2 = fc2.weight
        first = [p for p in (*norm.parameters(), *fc1.parameters()) if p.requires_grad]
        need_x = ctx.needs_input_grad[0]
        dx = torch.empty_like(x) if need_x else None
        acc: list[torch.Tensor | None] = [None] * len(first)
        dw2 = db2 = None
        for i in range(0, x.shape[0], ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            with torch.enable_grad(), torch.autocast(device_type=dev, dtype=dtype, enabled=enabled):  # as forward
                leaf = x[rows].detach().requires_grad_(need_x)
                h = act(fc1(norm(leaf)))  # [chunk, 4d], with its graph (norm and fc1 only)
            d = dout[rows]
            part = d.t().mm(h.detach()).to(w2.dtype)
            dw2 = part if dw2 is None else dw2.add_(part)
            if fc2.bias is not None:
                part = d.sum(0).to(w2.dtype)
                db2 = part if db2 is None else db2.add_(part)
            dh = d.mm(w2.to(d.dtype))
            inputs = ([leaf] if need_x else []) + first
            grads = list(torch.autograd.grad(h, inputs, dh)) if inputs else []
            del h, dh
            if need_x:
                dx[rows] = grads.pop(0)
            acc = [g if a is None else a.add_(g) for a, g in zip(acc, grads)]
        by_param = {id(p): g for p, g in zip(first, acc)}
        by_param[id(fc2.weight)] = dw2
        if db2 is not None:
            by_param[id(fc2.bias)] = db2
        own = [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]
        return (dx, None, None, None, None, None, *[by_param.get(id(p)) for p in own])


class RecomputedBlock(torch.autograd.Function):
    """A whole block that keeps only its inputs for backward and reruns its forward there (``"block"``).

    What `torch.utils.checkpoint` does, without it: its non-reentrant form imports ``torch._dynamo`` and
    ``sympy`` (0.13-0.19 GB of modules) on its first call. The forward runs without autograd; backward
    restores the random-number state of the forward (dropout draws the same masks) and its autocast state,
    reruns the block with autograd and differentiates it, so the gradients are those of the plain block.

    Args (forward):
        run: ``(x, tokens) -> (x, tokens)``, the block's forward on one level.
        x: ``[N, d]`` block input.
        tokens: ``[T, d]`` calibration tokens, or None.
        *params: The block's parameters (so autograd tracks them).
    """

    @staticmethod
    def forward(ctx, run, x, tokens, *params):  # noqa: D102
        dev = x.device.type
        ctx.run = run
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.has_tokens = tokens is not None
        ctx.set_materialize_grads(False)  # an unused output (the last block's tokens) gets None, not zeros
        ctx.save_for_backward(x, tokens if tokens is not None else x.new_empty(0), *params)
        with full_heads():  # the rerun in backward has autograd, so all heads at once: the same dropout order
            x_out, t_out = run(x, tokens)
        return x_out, t_out

    @staticmethod
    def backward(ctx, dx_out, dt_out):  # noqa: D102
        x, tokens, *params = ctx.saved_tensors
        dev, enabled, dtype = ctx.autocast
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(device_type=dev, dtype=dtype, enabled=enabled):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            leaf_x = x.detach().requires_grad_(ctx.needs_input_grad[1])
            leaf_t = tokens.detach().requires_grad_(ctx.needs_input_grad[2]) if ctx.has_tokens else None
            x_out, t_out = ctx.run(leaf_x, leaf_t)
        outs = [(o, g) for o, g in ((x_out, dx_out), (t_out, dt_out)) if o is not None and g is not None]
        inputs = [t for t, need in ((leaf_x, ctx.needs_input_grad[1]), (leaf_t, ctx.needs_input_grad[2]))
                  if need and t is not None] + [p for p in params if p.requires_grad]
        if not outs or not inputs:
            return (None, None, None, *[None for _ in params])
        grads = torch.autograd.grad([o for o, _ in outs], inputs, [g for _, g in outs], allow_unused=True)
        got = iter(grads)
        dx = next(got) if ctx.needs_input_grad[1] else None
        dt = next(got) if ctx.needs_input_grad[2] and ctx.has_tokens else None
        return (None, dx, dt, *[next(got) if p.requires_grad else None for p in params])


class RefineBlock(nn.Module):
    """Pre-LN monoscale refinement: ``X' = X + Proj(W-MSA(X) + MCA(X, Cb))``, ``X'' = X' + FFN(LN(X'))``.

    The calibration tokens are updated in the same block from the same normalised inputs:
    ``Cb <- Cb + Attn(...)`` (paper), or with ``token_update="block"`` (authors' code) the attention
    output goes through an output projection and is followed by ``Cb <- Cb + FFN(LN(Cb))``.
    ``dropout`` is the residual-branch dropout (neither the paper nor the authors' code has one; 0).
    ``checkpoint`` trades compute for memory in training: ``"ffn"`` recomputes the FFN's norm and hidden
    layer in backward (`RecomputedFFN`), ``"block"`` the whole block (`RecomputedBlock`, whose rerun
    recomputes its FFN again); ``"none"`` keeps every activation.
    """

    checkpoint: str = "none"
    ffn_chunk: int = 2048  # tokens per FFN chunk in inference and in `RecomputedFFN`'s backward (16 MB at d = 512)

    def __init__(
        self,
        dim: int,
        heads: int,
        half_window: int,
        *,
        positional: str = "rpb",
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        ffn_ratio: float = 4.0,
        activation: str = "relu",
        impl: str = "window",
        has_tokens: bool = True,
        mca_proj: str = "separate",
        token_update: str = "attn",
        n_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DualPathAttention(
            dim, heads, half_window, positional, attn_dropout, impl, has_tokens, mca_proj, token_update, n_tokens
        )
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * ffn_ratio)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dropout = dropout
        self.norm_tok = nn.LayerNorm(dim) if has_tokens else None
        self.token_ffn = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), type(self.act)(), nn.Linear(hidden, dim))
            if has_tokens and token_update == "block"
            else None
        )

    def forward(
        self, x: torch.Tensor, level: LevelIndex, tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [N, d]``, ``tokens [T, d]`` -> updated ``(x, tokens)``."""
        if self.checkpoint == "block" and self.training and torch.is_grad_enabled():
            params = [p for p in self.parameters() if p.requires_grad]
            return RecomputedBlock.apply(lambda x, t: self._forward(x, level, t), x, tokens, *params)
        return self._forward(x, level, tokens)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.fc2(self.act(self.fc1(self.norm2(x))))
        # Inference: token chunks with an in-place activation keep the [N, 4d] hidden layer small.
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], self.ffn_chunk):
            h = self.fc1(self.norm2(x[i : i + self.ffn_chunk]))
            h = torch.relu_(h) if isinstance(self.act, nn.ReLU) else self.act(h)
            out[i : i + self.ffn_chunk] = self.fc2(h)
        return out

    def _forward(
        self, x: torch.Tensor, level: LevelIndex, tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t_in = self.norm_tok(tokens) if tokens is not None else None
        a, t_upd = self.attn(self.norm1(x), level, t_in)
        x = x + F.dropout(a, self.dropout, self.training)
        if self.checkpoint in ("ffn", "block") and self.training and torch.is_grad_enabled():
            # (block: the rerun in `RecomputedBlock`'s backward keeps no [N, 4d] hidden layer either)
            params = [*self.norm2.parameters(), *self.fc1.parameters(), *self.fc2.parameters()]
            f = RecomputedFFN.apply(x, self.norm2, self.fc1, self.fc2, self.act, self.ffn_chunk, *params)
        else:
            f = self._ffn(x)
        x = x + F.dropout(f, self.dropout, self.training)
        if tokens is not None:
            tokens = tokens + t_upd
            if self.token_ffn is not None:
                tokens = tokens + self.token_ffn(tokens)
        return x, tokens


class Coarsen(nn.Module):
    """Dyadic coarsening: ``x_parent = sum_slot m_slot W_slot x_child`` = Linear(4 d_in -> d) of the 4 slots.

    Missing children contribute zero.
    """

    def __init__(self, dim_in: int, dim: int, norm: bool = True) -> None:
        super().__init__()
        self.dim_in = dim_in
        self.linear = nn.Linear(4 * dim_in, dim, bias=False)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor, down: Coarsening) -> torch.Tensor:
        """``x [N_fine, d_in]`` -> ``[N_coarse, d]``."""
        buf = x.new_zeros(down.coarse_coords.shape[0], 4, self.dim_in)
        buf = buf.index_put((down.parent, down.slot), x)
        return self.norm(self.linear(buf.flatten(1)))


class Uncoarsen(nn.Module):
    """Dyadic uncoarsening: Linear(d_in -> 4d), reshape into the 4 child slots, keep present children."""

    def __init__(self, dim_in: int, dim: int, norm: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(dim_in, 4 * dim)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor, down: Coarsening) -> torch.Tensor:
        """``x [N_coarse, d_in]`` -> ``[N_fine, d]`` through the fine level's (parent, slot) map."""
        z = self.linear(x).view(-1, 4, self.dim)
        return self.norm(z[down.parent, down.slot])
