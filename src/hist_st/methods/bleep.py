"""BLEEP: bi-modal contrastive embedding and top-k retrieval (Xie et al., NeurIPS 2023)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hist_st.methods.base import Method, options_of, register
from hist_st.methods.trainer import batched, fit_epochs, shuffled
from hist_st.slide import Slide

__all__ = ["BLEEPBaseline", "ProjectionHead", "bleep_loss"]


class ProjectionHead(nn.Module):
    """BLEEP's projection head: ``Linear - GELU - Linear - Dropout``, residual to the first Linear, LayerNorm.

    Shapes: ``[B, D_in] -> [B, D_proj]`` (``bowang-lab/BLEEP`` ``modules.py``).
    """

    def __init__(self, in_dim: int, proj_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, proj_dim)
        self.fc = nn.Linear(proj_dim, proj_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(F.gelu(projected)))
        return self.layer_norm(x + projected)


def bleep_loss(img_emb: torch.Tensor, spot_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP's CLIP-style loss with soft targets (``bowang-lab/BLEEP`` ``models.py::CLIPModel.forward``).

    ``logits = spot @ img.T / T``; targets ``softmax((img @ img.T + spot @ spot.T) / 2 * T)``, written as in
    BLEEP's code (which multiplies the similarities by T where the logits divide by it; at BLEEP's default
    T = 1, used here, both are the same); mean over the batch of the two soft cross-entropies.

    Args:
        img_emb: ``[B, D]`` projected image embeddings. spot_emb: ``[B, D]`` projected expression.
    """
    logits = spot_emb @ img_emb.T / temperature
    targets = F.softmax((img_emb @ img_emb.T + spot_emb @ spot_emb.T) / 2 * temperature, dim=-1)
    spots_loss = (-targets * F.log_softmax(logits, dim=-1)).sum(1)
    images_loss = (-targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    return ((images_loss + spots_loss) / 2.0).mean()


@register("bleep")
class BLEEPBaseline(Method):
    """BLEEP on frozen patch embeddings: contrastive image / expression projections, top-k retrieval.

    Defaults from ``bowang-lab/BLEEP`` (``config.py``, ``modules.py``, ``models.py``, ``BLEEP_main.py``,
    inference notebook):

    - two projection heads to 256-d (``Linear - GELU - Linear - Dropout(0.1)`` + residual + LayerNorm), one
      on the image features, one on the spot expression vector. BLEEP feeds harmony-corrected (batch
      integrated) expression of its HVGs; here the ``log1p`` raw counts of the table's genes, the target
      of every method (no batch correction, which would use the test slides' expression);
    - loss `bleep_loss` with temperature 1.0; AdamW lr 1e-3, weight decay 1e-3, batch 256;
    - inference: L2-normalise the projected query images and the projected expression of every training
      spot (the reference bank), take the top-k (k = 50) by cosine similarity and average those training
      spots' expression (BLEEP's "simple average").

    Differences, stated: BLEEP fine-tunes a ResNet-50 on raw patches; here (as in the HiST paper's
    comparison on shared features) the image branch is the frozen embedding ``embedding_key`` followed by
    the projection head. BLEEP's code trains ``max_epochs`` (default 4) and keeps the checkpoint with the
    lowest loss on a random 20% of spots; here a fixed 150 epochs (the count we recall from the BLEEP paper;
    not verified against the paper text) and the final model, nothing selected on test slides.

    Args:
        proj_dim, dropout, temperature: Model (256, 0.1, 1.0).
        lr, weight_decay, batch_size, epochs: Training.
        top_k: Training spots averaged per query (50).
        device: ``auto`` (CUDA when available, else CPU) or a torch device string.
    """

    def __init__(
        self, proj_dim: int = 256, dropout: float = 0.1, temperature: float = 1.0, lr: float = 1e-3,
        weight_decay: float = 1e-3, batch_size: int = 256, epochs: int = 150, top_k: int = 50,
        device: str = "auto",
    ) -> None:
        super().__init__(**options_of(locals()))

    def _fit(self, slides: list[Slide], rng: np.random.Generator, seed: int) -> None:
        x, y = self._xy(slides)
        xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()  # [M, C], [M, G]
        img_head = ProjectionHead(x.shape[1], self.proj_dim, self.dropout).to(self.device)
        spot_head = ProjectionHead(y.shape[1], self.proj_dim, self.dropout).to(self.device)
        opt = torch.optim.AdamW([*img_head.parameters(), *spot_head.parameters()], lr=self.lr,
                                weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(seed)

        def loss(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
            img, spot = img_head(xt[idx].to(self.device)), spot_head(yt[idx].to(self.device))
            return bleep_loss(img, spot, self.temperature), len(idx)

        # BLEEP's loader uses drop_last=True; keep the last batch unless it is a single spot.
        batches = shuffled(len(xt), self.batch_size, gen, min_size=2)
        self.history_ = fit_epochs([img_head, spot_head], opt, batches, loss, epochs=self.epochs)
        self.img_head_, self.spot_head_ = img_head.eval(), spot_head.eval()
        # [M, D] L2-normalised projected expression
        self.bank_key_ = F.normalize(batched(spot_head, yt.to(self.device), 4096), p=2, dim=-1)
        self.bank_y_ = y  # [M, G] log1p expression of the training spots

    def neighbours(self, slide: Slide) -> np.ndarray:
        """Indices ``[N, k]`` of the training spots retrieved for every spot of ``slide`` (best first)."""
        k = min(self.top_k, self.bank_key_.shape[0])
        q = torch.from_numpy(self._x(slide)).float().to(self.device)

        def top(qi: torch.Tensor) -> torch.Tensor:
            sim = F.normalize(self.img_head_(qi), p=2, dim=-1) @ self.bank_key_.T  # [n, M] cosine similarity
            return torch.topk(sim, k=k, dim=-1).indices

        return batched(top, q, 2048).cpu().numpy()

    def _predict(self, slide: Slide) -> np.ndarray:
        return self.bank_y_[self.neighbours(slide)].mean(axis=1)  # mean over [N, k] retrieved spots
