"""Table 5: calibration token vs Macenko stain normalisation, from one call.

Needs the same slides prepared twice, without and with ``--stain-norm macenko`` (only the embeddings
differ); ``hist-st stain --prepare ARGS`` prepares both first. Rows (`STAIN_ROWS`), all on the same folds and
genes: HiST with or without its calibration token on the plain or the Macenko cohort (``token-only`` is the
paper's default, ``neither`` a reference row not in the paper's table).

```python
from hist_st.experiments import run_stain
from hist_st.experiments.accuracy import CVSetup
run_stain("cohorts/her2st", "cohorts/her2st-macenko", "runs/stain", setup=CVSetup(genes="he:250", overrides=["epochs=100"]))
```
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hist_st.bench import markdown_table
from hist_st.errors import InputError
from hist_st.evaluate import make_plan
from hist_st.experiments.ablation import ablation_config, hist_rows, table_plan
from hist_st.experiments.accuracy import CVSetup
from hist_st.metrics import protocol_cells
from hist_st.train.data import list_slides

__all__ = ["STAIN_ROWS", "PAPER_TABLE5", "run_stain", "format_stain_table"]

#: name -> (label, cohort: "plain"/"macenko", calibration token on?)
STAIN_ROWS: dict[str, tuple[str, str, bool]] = {
    "macenko-only": ("Stain normalisation only (no calibration token)", "macenko", False),
    "token-only": ("Calibration token only (default)", "plain", True),
    "both": ("Both stain normalisation and calibration token", "macenko", True),
    "neither": ("Neither (reference)", "plain", False),
}
#: The paper's Table 5 (Brain): name -> (pooled R2, pooled PCC).
PAPER_TABLE5 = {"macenko-only": (0.20, 0.51), "token-only": (0.23, 0.54), "both": (0.25, 0.56)}


def run_stain(
    plain: str | Path,
    macenko: str | Path,
    out_dir: str | Path,
    *,
    setup: CVSetup | None = None,
    rows: Sequence[str] = ("macenko-only", "token-only", "both", "neither"),
    skip_done: bool = True,
    reuse_from: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Cross-validate the Table 5 rows on identical folds and genes.

    Args:
        plain: Cohort prepared without stain normalisation.
        macenko: The same slides prepared with ``--stain-norm macenko``.
        out_dir: Output: ``<row>/`` run directories, ``splits.json``, ``stain.json``, ``table.md``.
        setup: Gene set, folds, seed, HiST config and overrides, progress (`CVSetup`; folds by slide, so
            ``group_by`` must be None).
        rows: Rows to run (`STAIN_ROWS`).
        skip_done, reuse_from: As in `hist_st.experiments.ablation.run_ablation` (``token-only`` may come from
            Table 2's HiST run, ``neither`` from Table 3's ``no-token`` row).

    Returns:
        ``{"summaries": {row: summarise_folds(...)}, "table": str, "out_dir": str}``.
    """
    bad = [r for r in rows if r not in STAIN_ROWS]
    if bad:
        raise InputError("--rows", f"unknown row {bad[0]!r}; choose from {', '.join(STAIN_ROWS)}")
    ids_plain, ids_mac = ({p.stem for p in list_slides(c)} for c in (plain, macenko))
    if ids_plain != ids_mac:
        diff = sorted(ids_plain ^ ids_mac)
        raise InputError(macenko, f"the two cohorts hold different slides (e.g. {diff[:5]})")
    setup = setup or CVSetup()
    if setup.group_by is not None:
        raise InputError("group_by", "Table 5 folds by slide; run it without a group column")
    out = Path(out_dir)
    cfg, plan, info = table_plan(plain, out, setup, by_group=False)  # folds by slide only
    plans = {"plain": lambda: plan,  # the Macenko copy: same folds and genes, planned when first needed
             "macenko": functools.cache(lambda: make_plan(macenko, cfg.genes, folds=plan.folds, seed=cfg.seed,
                                                          embedding=cfg.embedding))}
    no_token = ablation_config(cfg, "no-token")
    table_rows = {name: (cfg if token else no_token, plans[which])
                  for name, (_, which, token) in STAIN_ROWS.items() if name in rows}
    title = "Calibration token vs Macenko stain normalisation (Table 5)"
    summaries, table = hist_rows(out, table_rows, setup, name="stain", table=format_stain_table,
                                 caption=(title, len(plan.genes), "Paper column: Brain (NCBI GEO)."),
                                 dist_info=info, reuse=skip_done, reuse_from=reuse_from)
    return {"summaries": summaries, "table": table, "out_dir": str(out)}


def format_stain_table(summaries: dict[str, Any], digits: int = 3) -> str:
    """Markdown Table 5 with both protocols and the paper's values."""
    paper = {name: "{:.2f} / {:.2f}".format(*values) for name, values in PAPER_TABLE5.items()}
    return "\n".join(markdown_table(
        ["Setting", "pooled R2", "pooled PCC", "per-gene PCC", "per-gene R2", "paper R2 / PCC (Brain)"],
        ([f"{label} `{name}`", *protocol_cells(summaries[name], digits), paper.get(name, "—")]
         for name, (label, _, _) in STAIN_ROWS.items() if name in summaries)))
