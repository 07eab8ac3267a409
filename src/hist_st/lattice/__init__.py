"""Sparse lattice: coordinates to sites, dyadic hierarchy, window partitions, batches."""

from hist_st.lattice.batch import LatticeBatch, LevelIndex, build_batch, build_level
from hist_st.lattice.coords import continuous_coords, to_lattice
from hist_st.lattice.hierarchy import Coarsening, coarsen
from hist_st.lattice.windows import WindowPartition, num_rel_offsets, rel_offset_index, window_partition

__all__ = [
    "Coarsening",
    "LatticeBatch",
    "LevelIndex",
    "WindowPartition",
    "build_batch",
    "build_level",
    "coarsen",
    "continuous_coords",
    "num_rel_offsets",
    "rel_offset_index",
    "to_lattice",
    "window_partition",
]
