"""HiST: the hierarchical sparse transformer (paper section 3.6)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hist_st.lattice import LatticeBatch, build_batch
from hist_st.model.blocks import Coarsen, RefineBlock, Uncoarsen
from hist_st.model.config import HiSTConfig, parse_levels
from hist_st.model.head import chunked_head

__all__ = ["HiST", "GRAD_CHECKPOINTING"]

#: `HiST.set_grad_checkpointing` modes.
GRAD_CHECKPOINTING = ("none", "ffn", "block", "level0")


class HiST(nn.Module):
    """Dyadic sparse encoder-decoder over one slide's lattice tokens.

    Encoder: at each resolution, refinement blocks, cache the features, coarsen. Decoder: from the
    second-deepest resolution up, uncoarsen, fuse with the cached encoder features (concatenate and
    project, by default), refine. A linear head predicts log1p expression; its bias starts at the
    training mean (`init_head_bias`), its weights at zero by default (``cfg.head_init``).

    Args:
        cfg: The architecture.
    """

    def __init__(self, cfg: HiSTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        enc_blocks, dec_blocks = parse_levels(cfg.levels)
        has_tokens = len(cfg.tokens) > 0
        self.in_proj = nn.Linear(cfg.in_dim, d, bias=False)

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                RefineBlock(
                    d,
                    cfg.heads,
                    cfg.half_window,
                    positional=cfg.positional,
                    dropout=cfg.residual_dropout,
                    attn_dropout=cfg.attn_dropout,
                    ffn_ratio=cfg.ffn_ratio,
                    activation=cfg.activation,
                    impl=cfg.attn_impl,
                    has_tokens=has_tokens,
                    mca_proj=cfg.mca_proj,
                    token_update=cfg.token_update,
                    n_tokens=len(cfg.tokens),
                )
                for _ in range(n)
            )

        self.encoder = nn.ModuleList(blocks(n) for n in enc_blocks)
        self.down = nn.ModuleList(Coarsen(d, d, cfg.coarsen_norm) for _ in enc_blocks[:-1] if cfg.resample)
        # Width entering each decoder stage's uncoarsening: 2d after a refine-then-fuse concat.
        wide = cfg.fuse == "refine-fuse" and cfg.skip == "concat"
        up: list[nn.Module] = []
        for i in range(len(dec_blocks)):
            d_in = 2 * d if (wide and i > 0) else d
            if cfg.resample:
                up.append(Uncoarsen(d_in, d, cfg.coarsen_norm))
            else:  # no spatial change: only a 2d -> d projection after a refine-then-fuse concat
                up.append(nn.Linear(d_in, d, bias=False) if d_in != d else nn.Identity())
        self.up = nn.ModuleList(up)
        self.fuse = nn.ModuleList(
            nn.Linear(2 * d, d, bias=False)
            for _ in dec_blocks
            if cfg.skip == "concat" and cfg.fuse == "fuse-refine"
        )
        self.decoder = nn.ModuleList(blocks(n) for n in dec_blocks)
        out_dim = 2 * d if (wide and dec_blocks) else d
        self.norm_out = nn.LayerNorm(out_dim) if cfg.head_norm else nn.Identity()
        self.head = nn.Linear(out_dim, cfg.n_genes)

        # Calibration tokens.
        self.n_learned = sum(t == "learned" for t in cfg.tokens)
        self.token_init = nn.Parameter(torch.zeros(self.n_learned, d)) if self.n_learned else None
        if "fixed" in cfg.tokens:
            g = torch.Generator().manual_seed(0)
            self.register_buffer("token_fixed", 0.02 * torch.randn(1, d, generator=g))
        n_transitions = 2 * len(dec_blocks) if cfg.resample else 0
        self.token_linear = (
            nn.ModuleList(nn.Linear(d, d) for _ in range(n_transitions))
            if cfg.token_transition and has_tokens
            else None
        )
        self.apply(self._init_weights)
        if cfg.head_init == "zero":
            nn.init.zeros_(self.head.weight)
        elif cfg.head_init == "small":
            nn.init.trunc_normal_(self.head.weight, std=0.002)
        if self.token_init is not None:
            nn.init.trunc_normal_(self.token_init, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ helpers
    def set_grad_checkpointing(self, mode: str = "ffn") -> None:
        """Recompute activations in backward to save memory.

        Args:
            mode: ``none``; ``ffn`` (every block's FFN norm and hidden layer); ``block`` (every whole block);
                ``level0`` (whole blocks at the full resolution only, where the tokens are: the first
                encoder stage and the last decoder stage; every block without resampling).
        """
        if mode not in GRAD_CHECKPOINTING:
            raise ValueError(f"grad checkpointing {mode!r}: choose {', '.join(GRAD_CHECKPOINTING)}")
        full = [self.encoder[0], self.decoder[-1]] if (self.cfg.resample and len(self.decoder)) else [self]
        level0 = {id(m) for stage in full for m in stage.modules() if isinstance(m, RefineBlock)}
        for m in self.modules():
            if isinstance(m, RefineBlock):
                m.checkpoint = ("block" if id(m) in level0 else "none") if mode == "level0" else mode

    @property
    def num_levels(self) -> int:
        return self.cfg.num_levels

    def make_batch(self, lattice: np.ndarray | torch.Tensor, feats: np.ndarray | torch.Tensor) -> LatticeBatch:
        """Build the `LatticeBatch` this model needs (levels, window, shift) from sites and features."""
        return build_batch(lattice, feats, self.num_levels, self.cfg.half_window, self.cfg.shifted)

    @torch.no_grad()
    def init_head_bias(self, mean_log1p: torch.Tensor | np.ndarray) -> None:
        """Set the head bias to the training set's mean log1p expression ``[G]``."""
        mean = torch.as_tensor(np.asarray(mean_log1p), dtype=self.head.bias.dtype)
        if mean.shape != self.head.bias.shape:
            raise ValueError(f"mean has shape {tuple(mean.shape)}, expected {tuple(self.head.bias.shape)}")
        self.head.bias.copy_(mean)

    def _initial_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        parts = []
        for kind in self.cfg.tokens:
            if kind == "max":
                parts.append(x.amax(0, keepdim=True))
            elif kind == "mean":
                parts.append(x.mean(0, keepdim=True))
            elif kind == "fixed":
                parts.append(self.token_fixed.to(x.dtype))
        if self.token_init is not None:
            parts.insert(0, self.token_init.to(x.dtype))
        return torch.cat(parts) if parts else None

    def _transition(self, tokens: torch.Tensor | None, i: int) -> torch.Tensor | None:
        if tokens is None or self.token_linear is None:
            return tokens
        return self.token_linear[i](tokens)

    # ------------------------------------------------------------------ forward
    def forward(
        self, batch: LatticeBatch, return_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Predict log1p expression.

        The head runs in float32 even under autocast: bfloat16 log1p outputs would be quantised in steps
        of 0.016-0.031 (2^-6..2^-5 near typical values), a few dozen distinct values per gene. Without
        autograd it runs in row chunks (`hist_st.model.head.chunked_head`), so the final norm's
        float32 copy of the features never exists whole.

        Args:
            batch: One slide (`make_batch`).
            return_tokens: Also return the final calibration tokens ``[T, d]``.

        Returns:
            ``[N, G]`` float32 log1p predictions (and the tokens).
        """
        x, tokens = self.trunk(batch)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if torch.is_grad_enabled():
                y = self.head(self.norm_out(x.float()))
            else:
                y = chunked_head(x, self.head, self.norm_out)
        return (y, tokens) if return_tokens else y

    def features(self, batch: LatticeBatch) -> torch.Tensor:
        """``[N, D]`` float32 features after the final norm: what the head reads (`hist_st.train.loss`)."""
        x, _ = self.trunk(batch)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.norm_out(x.float())

    def trunk(self, batch: LatticeBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder-decoder: ``([N, D] features before the final norm, [T, d] tokens or None)``."""
        cfg = self.cfg
        if len(batch.levels) < self.num_levels:
            raise ValueError(f"batch has {len(batch.levels)} levels; the model needs {self.num_levels}")
        if batch.half_window != cfg.half_window:  # the relative-position tables are sized for the model's window
            raise ValueError(
                f"batch was built with window half-size {batch.half_window} (windows of side {2 * batch.half_window}); "
                f"the model needs {cfg.half_window} (side {2 * cfg.half_window}): build it with model.make_batch"
            )
        x = F.dropout(self.in_proj(batch.feats), cfg.dropout, self.training)  # [N, d]
        tokens = self._initial_tokens(x)
        level_of = (lambda i: i) if cfg.resample else (lambda i: 0)

        cache = []
        t_i = 0
        for i, stage in enumerate(self.encoder):
            level = batch.levels[level_of(i)]
            for blk in stage:
                x, tokens = blk(x, level, tokens)
            cache.append(x)
            if i < len(self.down):
                x = self.down[i](x, level.down)
                tokens = self._transition(tokens, t_i)
                t_i += 1

        n_enc = len(self.encoder)
        for j, stage in enumerate(self.decoder):
            li = n_enc - 2 - j  # resolution of this decoder stage
            level = batch.levels[level_of(li)]
            if cfg.resample:
                x = self.up[j](x, batch.levels[li].down)
                tokens = self._transition(tokens, t_i)
                t_i += 1
            else:
                x = self.up[j](x)
            enc, cache[li] = cache[li], None  # not kept past its use (in inference: freed after the fuse)
            if cfg.skip == "additive":
                x = x + enc
            elif cfg.skip == "concat" and cfg.fuse == "fuse-refine":
                # fuse(cat[x, enc]) as two products: no [N, 2d] concatenation is kept for backward
                w_up, w_enc = self.fuse[j].weight.split(x.shape[-1], dim=1)
                x = torch.addmm(torch.mm(enc, w_enc.t()), x, w_up.t())  # the fuse Linear has no bias
            for blk in stage:
                x, tokens = blk(x, level, tokens)
            if cfg.skip == "concat" and cfg.fuse == "refine-fuse":
                x = torch.cat([x, enc], dim=-1)
        return x, tokens
