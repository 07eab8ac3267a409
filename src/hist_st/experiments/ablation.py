"""Table 3: component ablations of HiST as named configs, all on the same folds and genes.

Each ablation (`ABLATIONS`, listed by ``hist-st ablate --list``) changes one factor of the full model
(`TrainConfig` defaults plus the user's overrides): RPB positional terms, concat skips, all coordinate
augmentations, dyadic resampling, shifted windows and one calibration token.

```python
from hist_st.experiments import run_ablation
from hist_st.experiments.accuracy import CVSetup
res = run_ablation("cohorts/her2st", "runs/ablate", setup=CVSetup(genes="he:250", overrides=["epochs=100"]))
print(res["table"])
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hist_st.errors import InputError
from hist_st.evaluate import Plan, make_plan, run_cv
from hist_st.evaluate.cache import ResultCache
from hist_st.experiments.accuracy import CVSetup
from hist_st.jsonio import read_json, write_json
from hist_st.methods import HiSTMethod
from hist_st.metrics import protocol_cells
from hist_st.train.config import TrainConfig
from hist_st.train.distributed import DistInfo, init_distributed
from hist_st.train.folds import save_folds

__all__ = ["Ablation", "ABLATIONS", "PAPER_TABLE3", "ablation_config", "run_ablation", "format_ablation_table",
           "hist_rows", "table_plan"]


@dataclass(frozen=True)
class Ablation:
    """One row of Table 3.

    Attributes:
        name: Registry name (``aug-none``...).
        group: Table block (``Coordinate augmentation``...).
        label: Row label.
        apply: ``TrainConfig -> TrainConfig`` that changes one factor.
    """

    name: str
    group: str
    label: str
    apply: Callable[[Any], Any]


def _set(part: str, **kw: Any) -> Callable[[Any], Any]:
    """``cfg -> cfg`` with the fields ``kw`` of its ``part`` (``model``, ``augment``) changed."""
    return lambda cfg: dataclasses.replace(cfg, **{part: dataclasses.replace(getattr(cfg, part), **kw)})


def _only(which: str) -> Callable[[Any], Any]:
    """Coordinate augmentation ``which`` alone (spot dropout at the variant's default or the user's value)."""
    off = {"mirror": False, "shear": False, "rotate": False, "dropout": 0.0}
    others = {k: v for k, v in off.items() if k != which}
    return _set("augment", enabled=True, **others, **({} if which == "dropout" else {which: True}))


_ROWS = [
    Ablation("full", "", "Full model", lambda cfg: cfg),
    Ablation("aug-none", "Coordinate augmentation", "None", _set("augment", enabled=False)),
    Ablation("aug-mirror", "Coordinate augmentation", "Random mirror only", _only("mirror")),
    Ablation("aug-shear", "Coordinate augmentation", "Random shear only", _only("shear")),
    Ablation("aug-rotate", "Coordinate augmentation", "Random rotate only", _only("rotate")),
    Ablation("aug-drop", "Coordinate augmentation", "Random drop only", _only("dropout")),
    Ablation("pos-none", "Positional terms", "None", _set("model", positional="none")),
    Ablation("pos-rope", "Positional terms", "RoPE", _set("model", positional="rope")),
    Ablation("pos-alibi", "Positional terms", "ALiBi", _set("model", positional="alibi")),
    Ablation("skip-none", "Skip connections", "None", _set("model", skip="none")),
    Ablation("skip-additive", "Skip connections", "Additive", _set("model", skip="additive")),
    Ablation("no-resample", "Downsample-upsample", "None", _set("model", resample=False)),
    Ablation("no-shift", "Sparse window partition", "No shifted windows", _set("model", shifted=False)),
    Ablation("no-token", "Slide calibration token", "None", _set("model", tokens=())),
]
#: Every Table 3 row by name, in the paper's order.
ABLATIONS: dict[str, Ablation] = {a.name: a for a in _ROWS}

#: The paper's Table 3 (Brain, NCBI GEO): name -> (pooled R2, pooled PCC) means.
PAPER_TABLE3: dict[str, tuple[float, float]] = {
    "full": (0.228, 0.542), "aug-none": (0.149, 0.500), "aug-mirror": (0.153, 0.503),
    "aug-shear": (0.156, 0.504), "aug-rotate": (0.176, 0.508), "aug-drop": (0.184, 0.526),
    "pos-none": (0.131, 0.521), "pos-rope": (0.153, 0.522), "pos-alibi": (0.132, 0.522),
    "skip-none": (0.197, 0.527), "skip-additive": (0.213, 0.536), "no-resample": (0.213, 0.517),
    "no-shift": (0.217, 0.531), "no-token": (0.185, 0.509),
}


def ablation_config(cfg: Any, name: str) -> Any:
    """The `TrainConfig` of ablation ``name`` derived from the full-model ``cfg``.

    Raises:
        InputError: Unknown name (the message lists the known ones).
    """
    if name not in ABLATIONS:
        raise InputError("--configs", f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")
    return ABLATIONS[name].apply(cfg)


def format_ablation_table(summaries: dict[str, dict[str, Any]], digits: int = 3) -> str:
    """Markdown Table 3: rows grouped by component, both protocols with fold std, the change in pooled R2
    and per-gene PCC against the full model, and the paper's direction (Brain) for comparison.

    Args:
        summaries: Ablation name -> `summarise_folds` result (JSON-loaded is fine).
    """
    lines = ["| Setting | pooled R2 | pooled PCC | per-gene PCC | per-gene R2 | Δ pooled R2 | Δ per-gene PCC "
             "| paper R2 / PCC (Brain) | same direction as paper (pooled R2) |", "|---" * 9 + "|"]
    full, group = summaries.get("full"), None
    for name, abl in ((n, a) for n, a in ABLATIONS.items() if n in summaries):
        s = summaries[name]
        if abl.group and abl.group != group:
            group = abl.group
            lines.append(f"| *{group}* | | | | | | | | |")
        cells, d_r2, d_pcc, agree = protocol_cells(s, digits), "—", "—", "—"
        if full is not None and name != "full":
            dr2 = s["pooled"]["r2"]["mean"] - full["pooled"]["r2"]["mean"]
            dpcc = s["per_gene"]["pcc"]["mean"] - full["per_gene"]["pcc"]["mean"]
            d_r2, d_pcc = f"{dr2:+.{digits}f}", f"{dpcc:+.{digits}f}"
            paper_d = PAPER_TABLE3[name][0] - PAPER_TABLE3["full"][0]
            agree = "flat" if abs(dr2) < 5e-4 else ("yes" if (dr2 < 0) == (paper_d < 0) else "no")
        paper = "{:.3f} / {:.3f}".format(*PAPER_TABLE3[name])
        label = abl.label if name != "full" else "**Full model** (RPB, concat skips, all augmentations, 1 token)"
        lines.append(f"| {label} `{name}` | " + " | ".join([*cells, d_r2, d_pcc, paper, agree]) + " |")
    return "\n".join(lines)


def table_plan(cohort: str | Path, out: Path, setup: CVSetup, *, by_group: bool = True
               ) -> tuple[TrainConfig, Plan, DistInfo]:
    """What every row of a HiST table (Table 3 or 5) shares: HiST's config with the plan's genes fixed (one gene
    list for every row), the plan (its folds written to ``out/splits.json``, which names the group column
    unless ``by_group`` is False) and this process's place in a ``torchrun`` job."""
    cfg = setup.train_config()
    group = {"group_by": setup.group_by} if by_group else {}  # by_group=False: by slide, whatever the setup
    plan = make_plan(cohort, cfg.genes, k=setup.folds, seed=cfg.seed, embedding=cfg.embedding, **group)
    out.mkdir(parents=True, exist_ok=True)
    save_folds(plan.folds, out / "splits.json", k=setup.folds, seed=cfg.seed, **group, slides_dir=str(cohort))
    cfg = dataclasses.replace(cfg, genes=dataclasses.replace(cfg.genes, genes=tuple(plan.genes)))
    return cfg, plan, init_distributed(cfg.device)


def hist_rows(
    out: str | Path,
    rows: Mapping[str, tuple[TrainConfig, Callable[[], Plan]]],
    setup: CVSetup,
    *,
    name: str,
    caption: tuple[str, int, str],
    table: Callable[[dict[str, Any]], str],
    reuse: bool = True,
    reuse_from: Sequence[str | Path] = (),
    dist_info: DistInfo | None = None,
) -> tuple[dict[str, Any], str]:
    """The HiST rows of an experiment table (Table 3 or 5): ``run_cv(plan(), [HiST])`` into ``out/<row>``,
    each fold taken from the result cache (`hist_st.evaluate.cache`) when it was trained identically before;
    then the table, in ``out/table.md`` under its caption and above the rows taken from other folders.

    Args:
        out: The experiment folder: ``<row>/`` run folders, ``<name>.json`` (summaries), ``table.md`` and
            ``reused.json`` (row -> the folder that computed it, for rows taken whole from another folder).
        rows: Row -> ``(TrainConfig, plan)``; ``plan()`` gives the row's `Plan`.
        setup: The table's folds, seed and gene set (named in the caption) and progress bars.
        name: File name of the summaries (``ablation``, ``stain``).
        caption: ``(title, number of genes, note)`` of the paragraph above the table.
        table: Summaries -> the Markdown table.
        reuse: Look up the cache (the row's folder and ``reuse_from``); False: train every row.
        reuse_from: Other run folders whose caches are searched too, e.g. Table 2's HiST run.
        dist_info: As in `hist_st.evaluate.run_cv`.

    Returns:
        ``(summaries, table)``: row -> HiST's `summarise_folds` record; the Markdown table.
    """
    out, summaries, reused = Path(out), {}, {}
    cache = ResultCache(reuse_from) if reuse else None  # reuse_from searched once, for every row
    for row, (cfg, plan) in rows.items():
        res = run_cv(plan(), [HiSTMethod(cfg, dist_info=dist_info)], out / row, seed=cfg.seed,
                     write_predictions=False, dist_info=dist_info, progress=setup.progress, cache=cache)
        hist = res.methods.get(HiSTMethod.display_name)
        summaries[row] = hist.summary if hist is not None else None
        if hist is not None and hist.reused_from:
            reused[row] = hist.reused_from
    write_json(reused, out / "reused.json")
    summaries = read_json(write_json(summaries, out / f"{name}.json"))
    title, n_genes, note = caption
    text, taken = table(summaries), "; ".join(f"`{k}` from `{v}`" for k, v in reused.items())
    taken = ("\nRows reused from runs with the same config, cohort, folds and genes (not retrained): "
             f"{taken}.\n" if reused else "")
    (out / "table.md").write_text(f"{title}: {setup.folds}-fold, seed {setup.seed}, {n_genes} genes "
                                  f"({setup.genes}); mean ± std over folds. {note}\n\n{text}\n{taken}")
    return summaries, text


def run_ablation(
    cohort: str | Path,
    out_dir: str | Path,
    *,
    setup: CVSetup | None = None,
    names: Sequence[str] | None = None,
    skip_done: bool = True,
    reuse_from: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Train and cross-validate every ablation on identical folds and genes.

    Args:
        cohort: Prepared cohort folder.
        out_dir: Output: ``<name>/`` run_cv directories, ``splits.json``, ``ablation.json``, ``table.md``.
        setup: Gene set, folds, seed, HiST config and overrides, group column, progress (`CVSetup`).
        names: Ablations to run (default all, `ABLATIONS` order); ``full`` is always added.
        skip_done: Take each row's folds from the result cache when trained identically before
            (`hist_st.evaluate.cache`); False: train every row again.
        reuse_from: Other run folders whose caches are searched too, e.g. Table 2's HiST run for the full
            model. Rows taken from them are listed in ``reused.json`` and under the table.

    Returns:
        ``{"summaries": {name: summarise_folds(...)}, "table": str, "out_dir": str}``.
    """
    bad = [n for n in names or () if n not in ABLATIONS]
    if bad:
        raise InputError("--configs", f"unknown ablation {bad[0]!r}; choose from {', '.join(ABLATIONS)}")
    setup, out, wanted = setup or CVSetup(), Path(out_dir), {"full", *(names or ABLATIONS)}
    cfg, plan, info = table_plan(cohort, out, setup)
    rows = {name: (ablation_config(cfg, name), lambda: plan) for name in ABLATIONS if name in wanted}
    title = f"Ablations (Table 3) on {Path(cohort).name}"
    note = ("Δ columns: ablation minus full model. The paper's column is its Brain (NCBI GEO) Table 3, for "
            "direction only.")
    summaries, table = hist_rows(out, rows, setup, name="ablation", table=format_ablation_table,
                                 caption=(title, len(plan.genes), note), dist_info=info, reuse=skip_done,
                                 reuse_from=reuse_from)
    return {"summaries": summaries, "table": table, "out_dir": str(out), "n_genes": len(plan.genes)}
