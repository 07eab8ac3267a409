"""The inference head in row chunks (issue 15): no second float32 copy of the features exists whole."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["chunked_head"]


@torch.no_grad()
def chunked_head(features: Tensor, head: nn.Linear, norm: nn.Module | None = None, rows: int = 4096) -> Tensor:
    """Inference head in row chunks: ``head(norm(features))`` in float32 without a second ``[N, D]`` copy.

    Args:
        features: ``[N, D]`` trunk features (any float dtype).
        head: The ``Linear(D, G)`` head.
        norm: The final norm (applied per chunk), or None.
        rows: Spots per chunk.

    Returns:
        ``[N, G]`` float32 predictions.
    """
    out = torch.empty(features.shape[0], head.out_features, dtype=torch.float32, device=features.device)
    for i in range(0, features.shape[0], rows):
        x = features[i : i + rows].float()
        if norm is not None:
            x = norm(x)
        if head.bias is not None:
            torch.addmm(head.bias.float(), x, head.weight.float().t(), out=out[i : i + rows])
        else:
            torch.mm(x, head.weight.float().t(), out=out[i : i + rows])
    return out
