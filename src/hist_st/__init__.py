"""hist-st: HiST, a hierarchical sparse transformer that predicts spatial gene expression from H&E."""

from hist_st.errors import InputError
from hist_st.slide import Slide, read_prepared, write_prepared

__version__ = "0.1.0"

__all__ = ["InputError", "Slide", "read_prepared", "write_prepared", "__version__"]
