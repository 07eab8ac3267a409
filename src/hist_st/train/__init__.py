"""Training, checkpoints and prediction for HiST (SPEC section 2); cross-validation is `hist_st.evaluate`.

```python
from hist_st.train import load_config, train, load_bundle, predict_slide
cfg = load_config(None, ["epochs=20", "model.dim=64"])
result = train(cfg, "cohort/", out_dir="runs/exp1")
bundle = load_bundle("runs/exp1/model.pt")
pred = predict_slide(bundle, slide)
```
"""

from hist_st.train.augment import augment_coords, dropout_probability, schedule_strength
from hist_st.train.checkpoint import ModelBundle, load_bundle, load_checkpoint, save_checkpoint
from hist_st.train.config import (
    AugmentConfig,
    GeneConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from hist_st.train.data import epoch_keys, load_slides, rank_genes, select_genes, shard_indices
from hist_st.train.distributed import DistInfo, average_gradients, init_distributed
from hist_st.train.folds import load_folds, make_folds, save_folds
from hist_st.train.loop import TrainResult, forward_loss, train
from hist_st.train.predict import predict_folder, predict_log1p, predict_slide

__all__ = [
    "AugmentConfig",
    "DistInfo",
    "GeneConfig",
    "ModelBundle",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "augment_coords",
    "average_gradients",
    "config_from_dict",
    "config_to_dict",
    "dropout_probability",
    "epoch_keys",
    "forward_loss",
    "init_distributed",
    "load_bundle",
    "load_checkpoint",
    "load_config",
    "load_folds",
    "load_slides",
    "make_folds",
    "predict_folder",
    "predict_log1p",
    "predict_slide",
    "rank_genes",
    "save_checkpoint",
    "save_config",
    "save_folds",
    "schedule_strength",
    "select_genes",
    "shard_indices",
    "train",
]
