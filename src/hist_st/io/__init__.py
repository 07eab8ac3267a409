"""Readers: every input format to the same `hist_st.slide.Slide` record.

- `read_legacy_st` / `find_her2st_sections`: legacy Spatial Transcriptomics in the her2st layout;
- `read_spaceranger`: 10x Space Ranger ``outs/`` (HDF5 or MEX matrix, both positions formats);
- `read_hest` / `find_hest_samples`: HEST-1k samples (``st/``, ``patches/``, ``metadata/``, ``wsis/``);
- `read_anndata`: any AnnData with ``obsm['spatial']`` plus an image.
"""

from hist_st.io.anndata_reader import anndata_to_raw_slide, read_anndata
from hist_st.io.hest import HestSample, find_hest_samples, read_hest
from hist_st.io.legacy_st import LegacySTSection, find_her2st_sections, read_her2st_section, read_legacy_st
from hist_st.io.spaceranger import read_10x_h5, read_10x_mex, read_spaceranger, read_tissue_positions

__all__ = [
    "HestSample",
    "LegacySTSection",
    "anndata_to_raw_slide",
    "find_hest_samples",
    "find_her2st_sections",
    "read_10x_h5",
    "read_10x_mex",
    "read_anndata",
    "read_hest",
    "read_her2st_section",
    "read_legacy_st",
    "read_spaceranger",
    "read_tissue_positions",
]
