"""HiST as one method among the others: `hist_st.train.train` and `predict_log1p` behind `Method`.

Unlike the baselines, HiST writes a run folder while it trains (``model.pt``, ``config.yaml``,
``history.json``; `hist_st.train.loop.train`), trains on every rank of a ``torchrun`` job
(`distributed`), and can write prediction files (`prediction`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np

from hist_st.methods.base import Method, register
from hist_st.slide import Slide
from hist_st.train.config import TrainConfig, save_config
from hist_st.train.distributed import DistInfo
from hist_st.train.loop import train
from hist_st.train.predict import predict_log1p, predict_slide

__all__ = ["HiSTMethod"]


@register("hist")
class HiSTMethod(Method):
    """HiST trained with a `TrainConfig` (the config's ``seed`` is replaced by the ``seed`` of `fit`).

    Args:
        config: The training configuration (default: `TrainConfig()`).
        dist_info: This process's place in a ``torchrun`` job (default: a single process).
    """

    display_name: ClassVar[str] = "HiST"
    distributed: ClassVar[bool] = True

    def __init__(self, config: TrainConfig | None = None, *, dist_info: DistInfo | None = None) -> None:
        super().__init__(config=config or TrainConfig())
        self.dist_info = dist_info or DistInfo()

    def save_settings(self, out_dir: Path) -> None:
        """Write the resolved config as ``out_dir/config.yaml``."""
        save_config(self.config, out_dir / "config.yaml")

    def _fit(self, slides: list[Slide], rng: np.random.Generator, seed: int) -> None:
        cfg = self.config if self.config.seed == seed else dataclasses.replace(self.config, seed=int(seed))
        desc = self.out_dir_.name.replace("_", " ") if self.out_dir_ is not None else "train"
        result = train(cfg, slides, out_dir=self.out_dir_, genes=self.genes_, desc=desc,
                       dist_info=self.dist_info, overwrite=True)  # a cv run replaces its own earlier folds
        self.bundle_ = result.bundle
        self.history_ = list(result.history)

    def _predict(self, slide: Slide) -> np.ndarray:
        return predict_log1p(self.bundle_, slide)[0]  # one deterministic pass

    def prediction(self, slide: Slide, *, mc_samples: int = 0, seed: int = 0) -> Slide:
        """``slide`` with HiST's predictions (`hist_st.train.predict.predict_slide`), to write as a file."""
        return predict_slide(self.bundle_, slide, mc_samples=mc_samples, seed=seed)
