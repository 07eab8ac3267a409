"""Every method behind one interface: HiST and the baselines it is compared with.

```python
from hist_st.methods import get_method, list_methods
model = get_method("bleep", top_k=50).fit(train_slides, genes, embedding_key="efficientnet-lite0", seed=0)
pred = model.predict(test_slide)           # float32 [N, G], log1p of counts, columns in `genes` order
```

Registered (`list_methods`): ``hist`` (`HiSTMethod`, a `TrainConfig` as its option) and the baselines, each
class's docstring saying what it is, its published defaults and their source, and every deviation. The
neural baselines share one training loop (`hist_st.methods.trainer`).
"""

from hist_st.methods.base import (
    Method,
    check_methods,
    get_method,
    list_methods,
    log1p_targets,
    method_option_names,
    register,
    slide_embeddings,
    variant,
)
from hist_st.methods.bleep import BLEEPBaseline, bleep_loss
from hist_st.methods.hist import HiSTMethod
from hist_st.methods.simple import (
    DepthBaseline,
    MeanBaseline,
    MLPBaseline,
    RidgeBaseline,
    RobustRidgeBaseline,
)
from hist_st.methods.stflow import STFlowBaseline, STFlowDenoiser
from hist_st.methods.stnet import PatchSource, STNetBaseline, STNetLite0Baseline, image_patch_source

__all__ = [
    "Method", "check_methods", "get_method", "method_option_names", "list_methods", "register", "variant",
    "log1p_targets", "slide_embeddings", "HiSTMethod", "MeanBaseline", "RidgeBaseline", "RobustRidgeBaseline", "DepthBaseline",
    "MLPBaseline", "BLEEPBaseline", "bleep_loss", "STNetBaseline", "STNetLite0Baseline", "PatchSource",
    "image_patch_source", "STFlowBaseline", "STFlowDenoiser",
]
