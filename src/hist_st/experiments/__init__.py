"""The paper's experiments as functions: accuracy (Table 2), efficiency (Table 1, Figure 3), ablations
(Table 3), stain normalisation (Table 5), calibration-token analysis (Table 6, Figure 4), gene figures
(appendix C) and the one-command report. The ``hist-st bench``/``ablate``/``stain``/``tokens``/``plot``/
``report`` commands are thin wrappers over these.
"""

from hist_st.bench.efficiency import Workers, format_efficiency_table, measure, run_efficiency
from hist_st.bench.plots import plot_scaling
from hist_st.bench.scaling import run_scaling
from hist_st.experiments.ablation import ABLATIONS, PAPER_TABLE3, Ablation, ablation_config, run_ablation
from hist_st.experiments.accuracy import CVSetup, build_config, per_gene_rows, run_accuracy
from hist_st.experiments.report import ReportSpec, build_report
from hist_st.experiments.stain import PAPER_TABLE5, STAIN_ROWS, run_stain
from hist_st.experiments.tokens import (
    cosine_distances,
    export_tokens,
    format_token_table,
    plot_token_pca,
    run_token_analysis,
    slide_token,
    token_metrics,
)
from hist_st.pl import plot_genes

__all__ = [
    "ABLATIONS", "Ablation", "CVSetup", "PAPER_TABLE3", "PAPER_TABLE5", "ReportSpec", "STAIN_ROWS",
    "ablation_config", "build_config", "build_report", "cosine_distances", "export_tokens",
    "format_efficiency_table", "format_token_table", "measure", "per_gene_rows", "plot_genes",
    "plot_scaling", "plot_token_pca", "run_ablation", "run_accuracy", "run_efficiency", "run_scaling",
    "run_stain", "run_token_analysis", "slide_token", "token_metrics", "Workers",
]
