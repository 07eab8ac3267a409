"""hist-st: HiST, a hierarchical sparse transformer that predicts spatial gene expression from H&E.

The AnnData API, scanpy style (imported on first use, so ``import hist_st`` stays light):
``hist_st.pp`` (`embed`, `lattice`), ``hist_st.tl`` (`predict`), ``hist_st.pl`` (`plot_genes`).
"""

import importlib
from types import ModuleType

from hist_st.errors import InputError
from hist_st.slide import Slide, read_prepared, write_prepared

__version__ = "0.1.0"

#: Submodules loaded on first attribute access (``hist_st.tl`` brings torch).
_LAZY = ("pp", "tl", "pl")

__all__ = ["InputError", "Slide", "read_prepared", "write_prepared", "__version__", *_LAZY]


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY:
        return importlib.import_module(f"hist_st.{name}")
    raise AttributeError(f"module 'hist_st' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
