"""Comparison methods behind one interface, trained and evaluated exactly like HiST.

```python
from hist_st.baselines import get_baseline, list_baselines
model = get_baseline("bleep", top_k=50).fit(train_slides, genes, embedding_key="efficientnet-lite0", seed=0)
pred = model.predict(test_slide)           # float32 [N, G], log1p of counts, columns in `genes` order
```

Registered: ``mean`` (gene-mean floor), ``ridge`` (HEST-Benchmark probe), ``mlp`` (per-spot MLP, the
paper's UNI row), ``bleep`` (contrastive retrieval), ``stnet`` (end-to-end CNN fine-tuning on raw
patches), ``stflow`` (flow matching with a spatial transformer denoiser). Each class docstring lists
its published defaults and their source, and every deviation.
"""

from hist_st.baselines.base import (
    Baseline,
    baseline_option_names,
    get_baseline,
    list_baselines,
    log1p_targets,
    register,
    slide_embeddings,
)
from hist_st.baselines.bleep import BLEEPBaseline, bleep_loss
from hist_st.baselines.simple import MeanBaseline, MLPBaseline, RidgeBaseline
from hist_st.baselines.stflow import STFlowBaseline, STFlowDenoiser
from hist_st.baselines.stnet import PatchSource, STNetBaseline, image_patch_source

__all__ = [
    "Baseline",
    "get_baseline",
    "baseline_option_names",
    "list_baselines",
    "register",
    "log1p_targets",
    "slide_embeddings",
    "MeanBaseline",
    "RidgeBaseline",
    "MLPBaseline",
    "BLEEPBaseline",
    "bleep_loss",
    "STNetBaseline",
    "PatchSource",
    "image_patch_source",
    "STFlowBaseline",
    "STFlowDenoiser",
]
