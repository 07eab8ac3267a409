"""The HiST model: configuration, attention, blocks and the encoder-decoder."""

from hist_st.model.attention import DualPathAttention, rope_2d
from hist_st.model.blocks import Coarsen, RefineBlock, Uncoarsen
from hist_st.model.config import HiSTConfig, parse_levels
from hist_st.model.hist import HiST

__all__ = ["Coarsen", "DualPathAttention", "HiST", "HiSTConfig", "RefineBlock", "Uncoarsen", "parse_levels", "rope_2d"]
