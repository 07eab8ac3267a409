"""`HiSTConfig`: every architectural choice of the model, frozen and serialisable."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from hist_st.errors import InputError

__all__ = ["HiSTConfig", "parse_levels", "renamed_keys"]

POSITIONAL = ("rpb", "none", "rope", "alibi")
SKIPS = ("concat", "additive", "none")
FUSE = ("fuse-refine", "refine-fuse")
TOKENS = ("learned", "max", "mean", "fixed")
ATTN_IMPL = ("window", "neighbour", "dense")
ACTIVATIONS = ("relu", "gelu")
MCA_PROJ = ("separate", "shared")
TOKEN_UPDATE = ("attn", "block")
HEAD_INIT = ("random", "zero", "small")

#: Values of options added after a config could have been saved without them: a saved dict lacking the
#: key describes a model built with this behaviour (issue 16 changed these defaults).
LEGACY_VALUES: dict[str, Any] = {"head_norm": True, "mca_proj": "shared", "token_update": "attn",
                                  "head_init": "random"}


#: Keys of a saved model dict that were renamed since: old name -> new name.
RENAMED_KEYS = {"window": "half_window"}


def renamed_keys(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of a saved model dict with the keys saved before a rename (`RENAMED_KEYS`) under their new
    names, unless the new name is there too (then the old key stays, and is refused as unknown)."""
    new = {old: name for old, name in RENAMED_KEYS.items() if old in d and name not in d}
    return {new.get(k, k): v for k, v in d.items()}


def parse_levels(levels: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Parse a level/block string such as ``"111-21"``.

    The part before the dash gives the number of blocks at each encoder resolution (full, 1/2, 1/4,
    ...); the part after gives the decoder's blocks from the second-deepest resolution back up to the
    full one. ``"111-21"``: encoder 1 block at each of 3 resolutions; decoder 2 blocks at 1/2, 1 at full.

    Returns:
        ``(encoder_blocks, decoder_blocks)``; ``len(decoder) == len(encoder) - 1``.
    """
    enc, sep, dec = levels.partition("-")
    if not enc.isdigit() or (dec and not dec.isdigit()):
        raise ValueError(f"levels {levels!r}: expected digits such as '111-21'")
    encoder = tuple(int(c) for c in enc)
    decoder = tuple(int(c) for c in dec)
    if len(decoder) != len(encoder) - 1:
        raise ValueError(
            f"levels {levels!r}: {len(encoder)} encoder resolutions need {len(encoder) - 1} decoder stages"
        )
    return encoder, decoder


@dataclass(frozen=True)
class HiSTConfig:
    """Architecture of a HiST model (paper defaults; the authors' code behaviour as options).

    Attributes:
        in_dim: Patch-embedding width C.
        n_genes: Number of predicted genes G.
        levels: Blocks per level, ``"111-21"`` (see `parse_levels`).
        dim: Model width d at every level.
        heads: Attention heads.
        half_window: Window half-size w: windows of side 2w lattice sites (the default 3 gives 6 x 6 windows;
            the shifted partition is offset by w).
        dropout: Dropout after the input projection (paper code: 0.05).
        residual_dropout: Dropout on both residual branches of every refinement block; neither the
            paper nor the authors' code has it (default 0; hist-st before issue 16 used 0.05).
        attn_dropout: Dropout on attention probabilities.
        ffn_ratio: FFN hidden width / d.
        activation: FFN activation, ``relu`` (authors) or ``gelu``.
        tokens: Calibration tokens: ``("learned",)`` (paper: one shared learnable vector), any mix of
            ``learned``/``max``/``mean``/``fixed`` (authors: ``("max", "mean", "fixed")``), or ``()``
            for none.
        token_transition: Pass calibration tokens through a Linear at each resolution change (authors).
        positional: Positional term in window attention: ``rpb``, ``none``, ``rope``, ``alibi``.
        skip: Decoder skip connection: ``concat`` (paper), ``additive``, ``none``.
        fuse: ``fuse-refine`` (paper: concatenate, project, then refine) or ``refine-fuse`` (authors:
            refine the upsampled features, then concatenate; the next linear layer takes 2d).
        resample: Dyadic down/up-sampling; False keeps every stage at full resolution.
        shifted: Include the shifted window partition.
        coarsen_norm: LayerNorm after coarsening/uncoarsening linears (authors' code).
        head_norm: LayerNorm before the linear head; neither the paper ("a linear head") nor the
            authors' code has it (default False; hist-st before issue 16: True).
        mca_proj: Projections of MCA (tissue queries, calibration-token keys/values): ``separate`` (the
            paper writes MCA with its own W_Q, W_K, W_V and is silent on sharing; the authors' code uses
            separate ones) or ``shared`` (reuse W-MSA's q/k/v; hist-st before issue 16).
        token_update: Calibration-token update: ``attn`` (the paper's equation
            ``Cb <- Cb + Attn(Cb Wq, [X; Cb] Wk, [X; Cb] Wv)``) or ``block`` (the authors' code: the
            attention output goes through an output projection, then a pre-LN FFN on the tokens).
        head_init: The head's weights at the start: ``zero`` (default: the head starts by predicting its
            bias, the training means, at every spot, and a gene's weights grow only as far as its gradients
            agree; chosen by inner validation on training slides, ``docs/results/her2st.md``) or ``random``
            (truncated normal, std 0.02, as every other linear layer; hist-st before, and the authors' code,
            which builds the head as a plain ``nn.Linear``; the paper is silent). With a random head, the
            weights of a gene with little signal stay near their random draw, and its predictions are
            mostly noise. ``small``: random with std 0.002, a tenth of the others, so that a gene's random
            draw (row norm about 0.045 at d = 512) is no larger than what the zero head learns (0.023-0.042
            on her2st); on her2st's inner validation it scored like the zero head (``docs/results/her2st.md``).
        attn_impl: ``window`` (padded windows, log-sum-exp merge; fastest), ``neighbour`` (fixed-width
            neighbour gather) or ``dense`` (N x N masked reference, for tests only).
    """

    in_dim: int
    n_genes: int
    levels: str = "111-21"
    dim: int = 512
    heads: int = 8
    half_window: int = 3
    dropout: float = 0.05
    residual_dropout: float = 0.0
    attn_dropout: float = 0.05
    ffn_ratio: float = 4.0
    activation: str = "relu"
    tokens: tuple[str, ...] = ("learned",)
    token_transition: bool = False
    positional: str = "rpb"
    skip: str = "concat"
    fuse: str = "fuse-refine"
    resample: bool = True
    shifted: bool = True
    coarsen_norm: bool = True
    head_norm: bool = False
    mca_proj: str = "separate"
    token_update: str = "attn"
    head_init: str = "zero"
    attn_impl: str = "window"

    def __post_init__(self) -> None:
        """Validate every field up front; `InputError` (a ValueError) names the key and its allowed values."""
        try:
            parse_levels(self.levels)
        except (ValueError, AttributeError) as exc:
            raise InputError("config", f"model.levels: {exc}") from None
        object.__setattr__(self, "tokens", tuple(self.tokens))
        checks = {
            "positional": (self.positional, POSITIONAL),
            "skip": (self.skip, SKIPS),
            "fuse": (self.fuse, FUSE),
            "attn_impl": (self.attn_impl, ATTN_IMPL),
            "activation": (self.activation, ACTIVATIONS),
            "mca_proj": (self.mca_proj, MCA_PROJ),
            "token_update": (self.token_update, TOKEN_UPDATE),
            "head_init": (self.head_init, HEAD_INIT),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise InputError("config", f"model.{name}={value!r}: choose one of {', '.join(allowed)}")
        for tok in self.tokens:
            if tok not in TOKENS:
                raise InputError("config", f"model.tokens: unknown token kind {tok!r}; choose from {', '.join(TOKENS)}")
        for name in ("in_dim", "n_genes", "dim", "heads", "half_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InputError("config", f"model.{name} must be an integer >= 1, got {value!r}")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and 0.0 <= value < 1.0):
                raise InputError("config", f"model.{name} must lie in [0, 1), got {value!r}")
        if not (isinstance(self.ffn_ratio, numbers.Real) and math.isfinite(self.ffn_ratio)
                and int(self.dim * self.ffn_ratio) >= 1):
            raise InputError("config", f"model.ffn_ratio must be > 0 (hidden width >= 1), got {self.ffn_ratio!r}")
        if self.dim % self.heads:
            raise InputError("config", f"model.dim {self.dim} is not divisible by model.heads {self.heads}")
        if self.positional == "rope" and (self.dim // self.heads) % 4:
            raise InputError("config", "model.positional=rope needs a head width (dim / heads) divisible by 4")

    @property
    def num_levels(self) -> int:
        return len(parse_levels(self.levels)[0]) if self.resample else 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"] = list(self.tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HiSTConfig:
        """Rebuild from `to_dict`'s output. A dict saved before an option existed gets the value that
        reproduces the model it described (`LEGACY_VALUES`; ``residual_dropout`` = its ``dropout``; the
        window half-size saved as ``window`` before it was named ``half_window``)."""
        d = renamed_keys(d)
        for key, value in LEGACY_VALUES.items():
            d.setdefault(key, value)
        d.setdefault("residual_dropout", d.get("dropout", 0.05))
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError("config", f"model: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "tokens" in d:
            d["tokens"] = tuple(d["tokens"])
        return cls(**d)
