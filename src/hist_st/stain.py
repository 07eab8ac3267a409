"""Stain normalisation of H&E patches (Macenko, through torchstain)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from hist_st.wsi import open_image

__all__ = ["macenko_normaliser"]


def macenko_normaliser(reference: str | Path | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A batch transform uint8 ``[B, H, W, 3]`` -> uint8 that applies torchstain's Macenko normalisation.

    Args:
        reference: Optional reference H&E image to fit the target stain matrix; default: torchstain's
            standard reference stain vectors.

    Patches the method cannot normalise (background, too little tissue) are left unchanged.
    """
    import torch
    import torchstain

    norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    if reference is not None:
        img = open_image(reference)
        try:
            thumb, _ = img.thumbnail(1024)
        finally:
            img.close()
        norm.fit(torch.from_numpy(np.ascontiguousarray(thumb)).permute(2, 0, 1).float())

    def apply(batch: np.ndarray) -> np.ndarray:
        out = batch.copy()
        for i in range(len(batch)):
            try:
                t = torch.from_numpy(np.ascontiguousarray(batch[i])).permute(2, 0, 1).float()
                res, _, _ = norm.normalize(I=t, stains=False)
                arr = res.clamp(0, 255).round().to(torch.uint8).numpy()
                if np.isfinite(res.numpy()).all():
                    out[i] = arr
            except Exception:  # torchstain raises on near-empty patches (no stain to estimate)
                continue
        return out

    return apply
