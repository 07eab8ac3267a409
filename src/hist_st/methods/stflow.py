"""STFlow: whole-slide flow matching over gene expression (Huang et al., ICML 2025, arXiv 2506.05361).

Follows the authors' code (``stflow/flow/interpolant.py``, ``stflow/flow/noise.py``,
``stflow/model/denoiser.py``, ``stflow/model/transformer.py``, ``stflow/model/fa.py``,
``stflow/app/flow/train.py`` and ``test.py``; read from public copies of the repository):

- state: the slide's ``[N, G]`` log1p expression matrix. Prior: ``log1p`` of a zero-inflated negative
  binomial sample; the authors' default is one fixed ZINB for every gene (``total_count=1, logits=0.1,
  zi_logits=0``); ``prior="zinb-per-gene"`` (not STFlow's default) fits a ZINB per gene on the training
  spots by maximum likelihood instead.
- training: per crop, ``t ~ U(0, 1)``, ``x_t = (1 - t) x0 + t x1``; the denoiser predicts ``x1`` (clean
  expression) with an MSE loss; Adam lr 5e-4, gradient clipping 1.0, 100 epochs, 10 random sub-slide
  crops per slide per epoch, 2 crops per step.
- sampling: ``ts = linspace(0.01, 1, n_steps)`` (5 by default) and the official update, `euler_sample`
  (hist-st before issue 16 dropped its ``1 / (1 - t1)`` factor).
- denoiser: image features ``Linear(C, 128)`` plus a sinusoidal time embedding (MLP to 128); 4 blocks,
  each: attention over the k = 8 nearest spots (self excluded) whose logits come from an MLP on
  ``[q_i, k_j, edge_ij, x_j - x_i]`` per head (the neighbour's expression difference enters every
  attention logit, so cost grows with G; the MLP's first layer is applied per spot before gathering,
  `STFlowBlock.attention_logits`: the same function at 1 / (k x heads) of the G-sized products), values and
  edge features aggregated, an MLP, and a gene head
  ``Linear-GELU-LayerNorm-Dropout-Linear`` predicting ``x1``; the block's prediction is the next block's
  expression input; the output is the mean of the 4 blocks' predictions. Hidden 128, pairwise hidden 128,
  4 heads, dropout 0.2, attention dropout 0.2, SwiGLU MLPs (timm ``SwiGLUPacked`` with LayerNorm).
- E(2) invariance by frame averaging (``fa.py``): for each spot, its neighbours' relative positions are
  centred, their 2x2 covariance's eigenvectors give a frame, and the 4 sign choices of the two axes give 4
  frames; the projected positions (plus the distance) pass through the edge MLP and are averaged over the
  4 frames, so edge features are invariant to rotations and reflections of the slide (exactly, except
  for neighbourhoods whose covariance has equal eigenvalues, e.g. a full square-lattice ring, where the
  frame is not unique; the authors' method shares this limitation).

Stated differences: coordinates are divided by the slide's median nearest-neighbour distance (STFlow
feeds raw pixel offsets; this makes the edge MLP's input scale technology independent); the crop sampler
(STFlow's ``patch_distribution="uniform"``, whose source we could not read) is implemented as the
``round(r N)`` spots nearest a random centre spot with ``r ~ U(0, 1)`` (at least k + 1 spots). The
original code selects its epoch by Pearson on a validation split, which is the test slides when no
validation split exists (as in a 4-fold CV by slide): model selection on the test slides. Here the
final epoch is used, as for every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn

from hist_st.methods.base import Method, log1p_targets, options_of, register
from hist_st.methods.trainer import fit_epochs, shuffled
from hist_st.slide import Slide

__all__ = ["STFlowBaseline", "STFlowDenoiser", "euler_sample", "knn_graph", "fit_zinb_per_gene",
           "sample_zinb", "standard_gamma"]


def knn_graph(xy: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[N, k']`` of each spot's ``k' = min(k, N - 1)`` nearest other spots (self excluded)."""
    n = len(xy)
    kk = max(1, min(k, n - 1))
    if n == 1:
        return np.zeros((1, 1), dtype=np.int64)
    _, idx = cKDTree(xy).query(xy, k=kk + 1)  # [N, k' + 1]
    # Drop self (column 0 unless coordinates tie): stable-sort the own index to the end of each row.
    order = np.argsort(idx == np.arange(n)[:, None], axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)[:, :kk].astype(np.int64)


def standard_gamma(alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gamma(``alpha``, 1) draws on ``alpha``'s device from ``generator`` (Marsaglia & Tsang 2000, vectorised;
    ``alpha < 1`` through ``Gamma(alpha + 1) * U ** (1 / alpha)``). `torch.distributions.Gamma` takes no
    generator, so it could not make seeded draws on the GPU."""
    dev = alpha.device
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.zeros_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while bool(todo.any()):  # each round accepts > 95 % of what is left
        x = torch.randn(a.shape, generator=generator, device=dev, dtype=a.dtype)
        u = torch.rand(a.shape, generator=generator, device=dev, dtype=a.dtype)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        out = torch.where(todo & ok, d * v, out)
        todo = todo & ~ok
    u = torch.rand(a.shape, generator=generator, device=dev, dtype=a.dtype)
    return torch.where(boost, out * u.clamp_min(1e-30) ** (1.0 / alpha), out)


def sample_zinb(
    shape: tuple[int, ...], total_count, logits, zi_logits, generator: torch.Generator,
) -> torch.Tensor:
    """Draw ZINB counts ``[*shape]`` float32 (`torch.distributions` conventions) on ``generator``'s device.

    ``NegativeBinomial(total_count=r, logits=l)`` has mean ``r * exp(l)``: a Poisson with a
    ``Gamma(r) * exp(l)`` rate; zeros are inflated with probability ``sigmoid(zi_logits)``. Parameters are
    scalars or arrays broadcastable to ``shape`` (per gene on the last axis). Drawing on the GPU keeps the
    flow's source off the CPU, where it cost more than the network's step.
    """
    dev = generator.device
    r, lg, zi = (torch.as_tensor(np.asarray(v, dtype=np.float32), device=dev).expand(shape)
                 for v in (total_count, logits, zi_logits))
    rate = standard_gamma(r.contiguous(), generator) * torch.exp(lg)
    counts = torch.poisson(rate, generator=generator)
    zero = torch.rand(shape, generator=generator, device=dev) < torch.sigmoid(zi)
    return counts.masked_fill(zero, 0.0)


def fit_zinb_per_gene(counts: np.ndarray, steps: int = 300, lr: float = 0.05) -> dict[str, np.ndarray]:
    """Maximum-likelihood ZINB per gene (columns of raw ``counts`` ``[N, G]``), vectorised over genes.

    Returns:
        ``{"total_count", "logits", "zi_logits"}``, each float32 ``[G]`` in `torch.distributions` conventions.
    """
    x = torch.from_numpy(np.asarray(counts, dtype=np.float32))
    mean = x.mean(0).clamp_min(1e-3)
    log_r = torch.zeros(x.shape[1], requires_grad=True)
    log_mu = torch.log(mean).clone().requires_grad_(True)
    zi = torch.full((x.shape[1],), -2.0, requires_grad=True)
    opt = torch.optim.Adam([log_r, log_mu, zi], lr=lr)
    is_zero = x == 0
    for _ in range(steps):
        r = log_r.exp()
        # NB log-pmf with mean exp(log_mu) and dispersion r.
        log_nb = (torch.lgamma(x + r) - torch.lgamma(r) - torch.lgamma(x + 1)
                  + r * (log_r - torch.logaddexp(log_r, log_mu))
                  + x * (log_mu - torch.logaddexp(log_r, log_mu)))
        log_pi, log_1mpi = F.logsigmoid(zi), F.logsigmoid(-zi)
        ll = torch.where(is_zero, torch.logaddexp(log_pi, log_1mpi + log_nb), log_1mpi + log_nb)
        loss = -ll.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {"total_count": log_r.exp().numpy().astype(np.float32),
                "logits": (log_mu - log_r).numpy().astype(np.float32),  # mean = r * exp(logits)
                "zi_logits": zi.numpy().astype(np.float32)}


def _mlp(in_dim: int, hidden: int, out_dim: int, act: str, drop: float) -> nn.Module:
    from timm.layers import Mlp, SwiGLUPacked

    sizes = dict(in_features=in_dim, hidden_features=hidden, out_features=out_dim, drop=drop,
                 norm_layer=nn.LayerNorm)
    if act == "swiglu":
        return SwiGLUPacked(**sizes)
    return Mlp(act_layer={"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}[act], **sizes)


def frame_average_edges(rel: torch.Tensor) -> torch.Tensor:
    """Project neighbour offsets into their 4 PCA frames (``stflow/model/fa.py``).

    Args:
        rel: ``[N, K, 2]`` offsets of each spot's neighbours.

    Returns:
        ``[N, 4, K, 2]``: the centred offsets expressed in each of the 4 sign-flipped eigenframes.
    """
    x = rel - rel.mean(dim=1, keepdim=True)  # [N, K, 2]
    cov = torch.bmm(x.transpose(1, 2), x).detach()  # [N, 2, 2]
    _, vecs = torch.linalg.eigh(cov)  # [N, 2, 2], columns = eigenvectors
    signs = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=x.dtype, device=x.device)
    frames = vecs.unsqueeze(1) * signs[None, :, None, :]  # [N, 4, 2, 2]: column j scaled by sign j
    return torch.einsum("nkj,nfji->nfki", x, frames)


class STFlowBlock(nn.Module):
    """One denoiser block (the module docstring's "denoiser"): kNN attention, MLP and gene head."""

    def __init__(
        self, d_model: int, d_edge: int, n_genes: int, n_heads: int, act: str, drop: float, attn_drop: float,
    ) -> None:
        super().__init__()
        assert d_model % n_heads == 0 and d_edge % n_heads == 0
        self.h, self.dh, self.de = n_heads, d_model // n_heads, d_edge // n_heads
        self.qkv = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 3 * d_model))
        self.mlp_attn = _mlp(2 * self.dh + self.de + n_genes, d_model, 1, act, drop)
        self.edge_trans = _mlp(2 + 1, d_edge, d_edge, act, drop)
        self.w_out = _mlp(d_model + d_edge, d_model, d_model, act, drop)
        self.attn_drop = nn.Dropout(attn_drop)
        self.mlp = _mlp(d_model, 4 * d_model, d_model, act, drop)
        self.gene_head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model),
                                       nn.Dropout(drop), nn.Linear(d_model, n_genes), nn.Dropout(drop))

    def forward(self, x: torch.Tensor, h: torch.Tensor, coords: torch.Tensor,
                nbr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[N, G]`` state, h ``[N, D]`` tokens, coords ``[N, 2]``, nbr ``[N, K]`` -> (x ``[N, G]``, h)."""
        n, k = nbr.shape
        q, kk, v = (t.view(n, self.h, -1) for t in self.qkv(h).chunk(3, dim=-1))  # each [N, H, dh]
        rel = coords[nbr] - coords[:, None]  # [N, K, 2]
        dist = rel.norm(dim=-1, keepdim=True)  # [N, K, 1]
        edge_in = torch.cat([frame_average_edges(rel), dist[:, None].expand(n, 4, k, 1)], dim=-1)
        edge_h = self.edge_trans(edge_in).mean(dim=1).view(n, k, self.h, self.de)  # mean over the 4 frames
        logits = self.attention_logits(x, q, kk, edge_h, nbr)  # [N, K, H]
        attn = self.attn_drop(torch.softmax(logits.transpose(1, 2), dim=-1))  # [N, H, K]
        ctx = torch.einsum("nhk,nkhd->nhd", attn, v[nbr]).reshape(n, -1)
        ectx = torch.einsum("nhk,nkhd->nhd", attn, edge_h).reshape(n, -1)
        h = h + self.w_out(torch.cat([ctx, ectx], dim=-1))
        h = h + self.mlp(h)
        return self.gene_head(h), h

    def attention_logits(self, x: torch.Tensor, q: torch.Tensor, kk: torch.Tensor, edge_h: torch.Tensor,
                         nbr: torch.Tensor) -> torch.Tensor:
        """``mlp_attn`` on the message ``[q_i, k_j, edge_ij, x_j - x_i]`` of every edge and head -> ``[N, K, H]``.

        The authors concatenate the message (``[N, K, H, 2 dh + de + G]``) and apply the MLP. Its first layer is
        linear, so it is applied here to each part before gathering: ``W_g (x_j - x_i) = (W_g x)_j - (W_g x)_i``
        once per spot instead of once per edge and head, and ``W_k k_j`` once per spot. The same function (equal
        to float rounding, and the same dropout draws: `tests/test_methods.py`), at about 1 / (K H) of the
        G-sized products: 32x fewer for k = 8 and 4 heads, which dominated a step with 2,000 genes.
        """
        mlp = self.mlp_attn
        w_q, w_k, w_e, w_g = mlp.fc1.weight.split([self.dh, self.dh, self.de, x.shape[1]], dim=1)
        gx = F.linear(x, w_g)  # [N, hidden]
        pre = (F.linear(q, w_q, mlp.fc1.bias)[:, None] + F.linear(kk, w_k)[nbr] + F.linear(edge_h, w_e)
               + (gx[nbr] - gx[:, None])[:, :, None])  # [N, K, H, hidden] = mlp.fc1(message)
        if hasattr(mlp, "gate_last"):  # timm GluMlp (SwiGLUPacked): its forward after fc1
            a, b = pre.chunk(2, dim=-1)
            pre = a * mlp.act(b) if mlp.gate_last else mlp.act(a) * b
        else:  # timm Mlp
            pre = mlp.act(pre)
        return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(pre)))).squeeze(-1)


class STFlowDenoiser(nn.Module):
    """Predicts clean ``log1p`` expression ``[N, G]`` from a noisy state, features, coordinates and ``t``."""

    def __init__(
        self, in_dim: int, n_genes: int, hidden: int = 128, pair_hidden: int = 128, n_layers: int = 4,
        n_heads: int = 4, dropout: float = 0.2, attn_dropout: float = 0.2, activation: str = "swiglu",
    ) -> None:
        super().__init__()
        self.image_transform = nn.Linear(in_dim, hidden)
        self.time_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(STFlowBlock(hidden, pair_hidden, n_genes, n_heads, activation, dropout,
                                                attn_dropout) for _ in range(n_layers))

    def forward(self, x_t: torch.Tensor, feats: torch.Tensor, coords: torch.Tensor, nbr: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        """x_t ``[N, G]``, feats ``[N, C]``, coords ``[N, 2]``, nbr ``[N, K]``, scalar t -> ``[N, G]``."""
        steps = torch.arange(128, dtype=torch.float32, device=t.device)  # t as 256 sinusoids, then an MLP
        freqs = torch.exp(-math.log(10000.0) * steps / 128)
        args = t.float().reshape(1, 1) * freqs  # [1, 128]
        temb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # [1, D]
        h = self.image_transform(feats) + temb  # [N, D]
        preds = []
        for blk in self.blocks:
            x_t, h = blk(x_t, h, coords, nbr)  # the block's prediction is the next block's state
            preds.append(x_t)
        return torch.stack(preds).mean(dim=0)


@register("stflow")
class STFlowBaseline(Method):
    """STFlow (see the module docstring for the method, its sources and the stated differences).

    Args:
        n_neighbors: k of the kNN graph (8).
        hidden, pair_hidden, n_layers, n_heads: Denoiser (128, 128, 4, 4).
        dropout, attn_dropout, activation: (0.2, 0.2, "swiglu").
        n_steps: Sampling time points (5, i.e. 4 denoiser evaluations).
        prior: ``"zinb"`` (STFlow's fixed ZINB) or ``"zinb-per-gene"`` (fitted on the training spots).
        zinb_total_count, zinb_logits, zinb_zi_logits: The fixed prior (1, 0.1, 0).
        lr, clip_norm, epochs, crops_per_slide, crops_per_step: Training (5e-4, 1.0, 100, 10, 2).
        max_steps: Stop after this many optimiser steps (None = all epochs).
        device: ``auto`` (CUDA when available, else CPU) or a torch device string.
    """

    def __init__(
        self, n_neighbors: int = 8, hidden: int = 128, pair_hidden: int = 128, n_layers: int = 4,
        n_heads: int = 4, dropout: float = 0.2, attn_dropout: float = 0.2, activation: str = "swiglu",
        n_steps: int = 5, prior: str = "zinb", zinb_total_count: float = 1.0, zinb_logits: float = 0.1,
        zinb_zi_logits: float = 0.0, lr: float = 5e-4, clip_norm: float = 1.0, epochs: int = 100,
        crops_per_slide: int = 10, crops_per_step: int = 2, max_steps: int | None = None,
        device: str = "auto",
    ) -> None:
        if prior not in ("zinb", "zinb-per-gene"):
            raise ValueError(f"prior must be 'zinb' or 'zinb-per-gene', got {prior!r}")
        if n_steps < 2:
            raise ValueError("n_steps must be >= 2 (n_steps - 1 denoiser evaluations)")
        super().__init__(**options_of(locals()))

    def _slide_arrays(self, slide: Slide) -> tuple[torch.Tensor, torch.Tensor]:
        xy = np.asarray(slide.spatial, dtype=np.float64)
        scale = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])) if len(xy) > 1 else 0.0
        xy = (xy - xy.mean(axis=0)) / (scale if scale > 0 else 1.0)  # median nearest-neighbour distance
        return torch.from_numpy(self._x(slide)).float(), torch.from_numpy(xy).float()

    def _prior(self, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        """``log1p`` of a ZINB draw ``[*shape]`` on the device (the flow's source distribution)."""
        p = self.prior_params_
        return torch.log1p(sample_zinb(shape, p["total_count"], p["logits"], p["zi_logits"], gen))

    def _crop(self, xy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(xy)
        m = int(max(min(n, self.n_neighbors + 1), round(rng.uniform(0.0, 1.0) * n)))
        if m >= n:
            return np.arange(n)
        centre = xy[rng.integers(n)]
        return np.argsort(((xy - centre) ** 2).sum(axis=1), kind="stable")[:m]

    def _fit(self, slides: list[Slide], rng: np.random.Generator, seed: int) -> None:
        self.seed_ = seed
        gen = torch.Generator().manual_seed(seed)
        prior_gen = torch.Generator(device=self.device).manual_seed(seed)
        data = [(*self._slide_arrays(s), torch.from_numpy(log1p_targets(s, self.genes_))) for s in slides]
        self.prior_params_ = {"total_count": self.zinb_total_count, "logits": self.zinb_logits,
                              "zi_logits": self.zinb_zi_logits}
        if self.prior == "zinb-per-gene":
            raw = np.expm1(np.concatenate([d[2].numpy() for d in data]).astype(np.float64)).round()
            self.prior_params_ = fit_zinb_per_gene(raw)
        model = STFlowDenoiser(data[0][0].shape[1], len(self.genes_), self.hidden, self.pair_hidden,
                               self.n_layers, self.n_heads, self.dropout, self.attn_dropout,
                               self.activation).to(self.device)
        # One epoch = crops_per_slide random crops of every slide, in random order (STFlow's sample_times).
        items = [i for i in range(len(data)) for _ in range(self.crops_per_slide)]

        def loss(crops: np.ndarray) -> tuple[torch.Tensor, int]:
            sq_sum, n_el = 0.0, 0
            for j in crops:
                feats, xy, y = data[items[j]]
                sel = torch.from_numpy(self._crop(xy.numpy(), rng))
                c = xy[sel]  # [n, 2] on the CPU, where the kNN graph is built
                nbr = torch.from_numpy(knn_graph(c.numpy(), self.n_neighbors)).to(self.device)
                f, c, x1 = feats[sel].to(self.device), c.to(self.device), y[sel].to(self.device)
                t = torch.rand((), generator=gen)
                x0 = self._prior(tuple(x1.shape), prior_gen)
                pred = model((1 - t) * x0 + t * x1, f, c, nbr, t.to(self.device))  # x_t on the straight path
                sq_sum = sq_sum + ((pred - x1) ** 2).sum()
                n_el += x1.numel()
            # MSE over all spots and genes of the step's crops (STFlow pads the crops and masks).
            return sq_sum / n_el, 1

        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        self.history_ = fit_epochs([model], opt, shuffled(len(items), self.crops_per_step, rng), loss,
                                   epochs=self.epochs, max_steps=self.max_steps, clip_norm=self.clip_norm)
        self.model_ = model.eval()

    @torch.no_grad()
    def _predict(self, slide: Slide) -> np.ndarray:
        feats, xy = self._slide_arrays(slide)
        nbr = torch.from_numpy(knn_graph(xy.numpy(), self.n_neighbors)).to(self.device)
        feats, xy = feats.to(self.device), xy.to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed_ + 1)
        x = self._prior((slide.n_spots, len(self.genes_)), gen)
        ts = torch.linspace(0.01, 1.0, self.n_steps)
        pred = euler_sample(lambda xt, t: self.model_(xt, feats, xy, nbr, t.to(self.device)), x, ts)
        return pred.cpu().numpy()


def euler_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, ts: torch.Tensor,
) -> torch.Tensor:
    """STFlow's sampler (the official ``x + dt * (x_hat - x) / (1 - t)`` update).

    For each consecutive pair ``(t1, t2)`` of ``ts`` the denoiser predicts the clean state ``x1_hat`` from
    ``x_t1``; the state moves along the straight path towards it, ``x <- x + (t2 - t1) (x1_hat - x) /
    (1 - t1)`` (the velocity of ``x_t = (1 - t) x0 + t x1`` is ``(x1 - x_t) / (1 - t)``); the last
    prediction is returned (``len(ts) - 1`` denoiser calls).

    Args:
        denoise: ``(x_t [N, G], t []) -> x1_hat [N, G]``.
        x: ``[N, G]`` prior sample at ``ts[0]``.
        ts: ``[S]`` increasing times, ``ts[-2] < 1``.

    Returns:
        ``[N, G]`` the final prediction of the clean state.
    """
    for t1, t2 in zip(ts[:-2], ts[1:-1]):
        x = x + (t2 - t1) * (denoise(x, t1) - x) / (1 - t1)
    return denoise(x, ts[-2])
