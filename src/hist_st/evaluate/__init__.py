"""Evaluation: a plan (slides, folds and genes computed once) and cross-validation of any methods on it.

```python
from hist_st.evaluate import make_plan, run_cv
plan = make_plan("cohorts/her2st", GeneConfig.from_spec("he:250"), k=4, seed=0)
res = run_cv(plan, [HiSTMethod(cfg), get_method("ridge")], "runs/cv")   # CVResult: res.methods["ridge"].summary
```

The metrics themselves (both protocols) are `hist_st.metrics`, re-exported here.
"""

from hist_st.evaluate.cache import ResultCache
from hist_st.evaluate.cv import PROTOCOLS, build_methods, cross_validate, fold_model, plot_loss_curves, run_cv
from hist_st.evaluate.plan import Plan, make_plan, slide_groups
from hist_st.evaluate.results import CVResult, FoldRecord, MethodSummary
from hist_st.metrics import evaluate_fold, format_table, per_gene_metrics, pooled_metrics, summarise_folds

__all__ = [
    "CVResult", "FoldRecord", "MethodSummary", "PROTOCOLS", "Plan", "ResultCache", "build_methods", "cross_validate",
    "evaluate_fold", "fold_model", "format_table", "make_plan", "per_gene_metrics", "plot_loss_curves",
    "pooled_metrics", "run_cv", "slide_groups", "summarise_folds",
]
