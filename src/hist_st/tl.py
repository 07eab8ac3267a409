"""Tools on AnnData, scanpy style: predict gene expression of the spots of ``adata`` with a trained HiST.

A thin function over `hist_st.train.predict.predict_slide` (what ``hist-st predict`` runs), reading the
spots' embeddings from ``obsm[use_rep]`` (e.g. written by `hist_st.pp.embed`, or a prepared slide's
``obsm['X_<encoder>']``).

```python
import hist_st as hs
hs.pp.embed(adata, "he.tif", um_per_px=0.2125)
hs.tl.predict(adata, "runs/her2st/model.pt")          # obsm['predicted'] [N, G], uns['predicted']['genes']
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hist_st.errors import InputError
from hist_st.io._util import attach_lattice, fill_pitch
from hist_st.pp import spots_of
from hist_st.train.checkpoint import ModelBundle, load_bundle
from hist_st.train.predict import predict_slide

__all__ = ["predict"]


def predict(
    adata: Any,
    model: str | Path | ModelBundle,
    *,
    use_rep: str = "X_hist_embedding",
    key_added: str = "predicted",
    um_per_px: float | None = None,
    mc_samples: int = 0,
    seed: int = 0,
    device: str = "cpu",
    copy: bool = False,
) -> Any | None:
    """Predict every spot's expression of the model's genes from its patch embedding and its neighbours.

    Spots are placed on the model's lattice as ``hist-st predict`` places them; an AnnData that hist-st did
    not write (no ``uns['hist_st']``) first has its spot grid measured from ``obsm['spatial']``, as
    ``hist-st prepare`` does. The embeddings must come from
    the encoder and patch geometry the model was trained with.

    Args:
        adata: AnnData with ``obsm['spatial']`` (full-resolution pixels) and ``obsm[use_rep]`` ``[N, C]``.
        model: A checkpoint (``model.pt``, or its run folder) or a loaded `ModelBundle`.
        use_rep: The embeddings to read.
        key_added: Where the predictions go.
        um_per_px: Microns per full-resolution pixel (default: recorded in ``adata``).
        mc_samples: Monte Carlo dropout passes for a per-spot std (0: one deterministic pass).
        seed: Seed of the MC-dropout passes.
        device: Where the model runs (a path ``model`` only).
        copy: Return an annotated copy instead of annotating ``adata``.

    Returns:
        None, or the copy with ``copy=True``. Writes ``obsm[key_added]`` (float32 ``[N, G]``, counts:
        ``relu(expm1(log1p prediction))``), ``obsm[key_added + '_std']`` with ``mc_samples > 0`` (count
        space), and ``uns[key_added]`` (``genes``: the G column names; ``params``: model, use_rep,
        embedding, lattice unit, mc_samples, seed).

    Raises:
        InputError: An unreadable checkpoint, no ``obsm[use_rep]``, embeddings of another width than the
            model's, no um per pixel known, or non-finite predictions.
    """
    adata = adata.copy() if copy else adata
    if use_rep not in adata.obsm:
        raise InputError("use_rep", f"obsm[{use_rep!r}] not found (have {sorted(adata.obsm)}); run hist_st.pp.embed")
    slide = spots_of(adata, um_per_px=um_per_px, need_um=True)  # cheap checks before reading the checkpoint
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model, device)
    if "hist_st" not in adata.uns:  # not a hist-st slide: measure the grid as `hist-st prepare` does
        fill_pitch(slide)
        attach_lattice(slide)
    slide.embeddings = {bundle.embedding: np.asarray(adata.obsm[use_rep], dtype=np.float32)}
    out = predict_slide(bundle, slide, mc_samples=mc_samples, seed=seed)
    adata.obsm[key_added] = out.predicted
    if out.predicted_std is not None:
        adata.obsm[f"{key_added}_std"] = out.predicted_std
    adata.uns[key_added] = {
        "genes": [str(g) for g in bundle.genes],
        "params": {"model": str(model) if not isinstance(model, ModelBundle) else "ModelBundle", "use_rep": use_rep,
                   "embedding": bundle.embedding,
                   "lattice_unit_um": float(out.meta["prediction"]["lattice_unit_um"] or np.nan),
                   "mc_samples": int(mc_samples), "seed": int(seed)},
    }
    return adata if copy else None
