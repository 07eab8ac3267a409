"""Table 2: every method on identical folds, genes, targets and embeddings, both metric protocols.

```python
from hist_st.experiments import run_accuracy
res = run_accuracy(["cohorts/her2st"], "runs/acc", methods=["hist", "ridge", "mean"], genes="he:250",
                   folds=4, seed=0, overrides=["epochs=100"])
print(res["table"])
```

Run directory layout (``OUT``)::

    accuracy.json                 per cohort, per method: fold summaries (mean, std, values), seconds
    table.md                      one Markdown table per cohort, both protocols labelled, and per-gene PCC
                                  by fifths of the genes' expression level (`hist_st.evaluate.strata`)
    per_gene.csv                  cohort, method, gene, its expression level, per-gene PCC/R2 mean over folds
                                  and per fold
    <cohort>/                     the `run_cv` run directory (splits.json, genes.txt, fold_<i>/metrics.json,
                                  fold_<i>/model.pt and predictions for HiST)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hist_st.errors import InputError
from hist_st.evaluate import PROTOCOLS, build_methods, make_plan, run_cv
from hist_st.evaluate.cache import ResultCache
from hist_st.evaluate.strata import expression_level, per_gene_by_level
from hist_st.jsonio import read_json, write_json
from hist_st.methods import HiSTMethod, check_methods, method_option_names
from hist_st.metrics import format_table
from hist_st.runtime import device_name, resolve_device
from hist_st.train.config import TrainConfig, config_to_dict, load_config, with_gene_set
from hist_st.train.distributed import init_distributed

__all__ = ["display", "build_config", "CVSetup", "run_accuracy", "per_gene_rows"]


def display(method: str) -> str:
    """A method's name in tables (`hist_st.methods.Method.label`): ``hist`` -> ``HiST``, others unchanged."""
    return HiSTMethod.display_name if method == HiSTMethod.name else method


def build_config(
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    seed: int | None = None,
    genes: str | None = None,
    progress: bool | None = None,
) -> Any:
    """The HiST `TrainConfig` of an experiment: YAML + ``key=value`` overrides, then seed/genes/progress.

    Args:
        config: Optional YAML file of `TrainConfig` keys.
        overrides: ``["epochs=100", "model.dim=256"]``.
        seed: Overrides ``cfg.seed`` (also the fold seed) when given.
        genes: A gene-set spec (`hist_st.cohort.GeneSet`: ``hvg:2000``, ``he:250``) for ``cfg.genes``.
        progress: Overrides ``cfg.progress`` when given.
    """
    changes: dict[str, Any] = {"seed": int(seed)} if seed is not None else {}
    if progress is not None:
        changes["progress"] = bool(progress)
    return dataclasses.replace(load_config(config, with_gene_set(overrides, genes)), **changes)


@dataclass(frozen=True)
class CVSetup:
    """What a cross-validated HiST experiment (Tables 3 and 5) is run with, besides its cohort and rows.

    Attributes:
        genes: Gene-set spec, ``hvg:N`` or ``he:N`` (`hist_st.cohort.GeneSet`).
        folds: Number of folds (by slide unless ``group_by``).
        seed: Fold and training seed.
        config: HiST `TrainConfig` YAML (None: defaults).
        overrides: ``key=value`` overrides of it, e.g. ``["epochs=100"]``.
        group_by: Group column for folds (e.g. ``patient``); None = by slide (the paper).
        progress: Progress bars.
    """

    genes: str = "hvg:2000"
    folds: int = 4
    seed: int = 0
    config: str | Path | None = None
    overrides: Sequence[str] = ()
    group_by: str | None = None
    progress: bool = True

    def train_config(self) -> TrainConfig:
        """HiST's `TrainConfig` (`build_config` of these settings)."""
        return build_config(self.config, self.overrides, seed=self.seed, genes=self.genes, progress=self.progress)


def _cohort_names(cohorts: Sequence[str | Path]) -> list[str]:
    names: list[str] = []
    for c in cohorts:
        base = Path(c).resolve().name or "cohort"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _device(method: str, shown: str, source: str | None, name: str, cfg: Any,
            baseline_options: Mapping[str, Mapping[str, Any]]) -> str:
    """The device that trained ``method`` (shown as ``shown``) on cohort ``name``, by name: as recorded in the
    accuracy folder ``source`` the row was copied from, else in this process (HiST: ``cfg.device``; baselines:
    their ``device`` option; methods without one run on the CPU)."""
    path = Path(source or "") / "accuracy.json"
    recorded = read_json(path).get("cohorts", {}) if source is not None and path.is_file() else {}
    pref = cfg.device if method == "hist" else (baseline_options.get(method, {}).get("device", "auto")
                                                if "device" in method_option_names(method) else "cpu")
    return recorded.get(name, {}).get("devices", {}).get(shown) or device_name(str(resolve_device(str(pref))))


def per_gene_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """Per-gene PCC/R2 of every method in a `run_cv` directory: mean over folds plus each fold's value.

    Reads ``fold_<i>/metrics.json``. Genes constant in a fold's test set have no value for that fold.

    Returns:
        One dict per (method, gene): ``method``, ``gene``, ``pcc_mean``, ``r2_mean``, ``n_folds``
        (folds in which the gene was evaluated) and ``pcc_fold<i>`` / ``r2_fold<i>``.
    """
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(Path(run_dir).glob("fold_*/metrics.json"), key=lambda p: int(p.parent.name[5:])):
        rec = read_json(path)
        for method, m in rec["metrics"].items():
            pcc, r2 = m["per_gene"].get("pcc_per_gene", {}), m["per_gene"].get("r2_per_gene", {})
            for gene in pcc:
                row = table.setdefault((method, gene), {"method": method, "gene": gene})
                row.update({f"pcc_fold{rec['fold']}": pcc[gene], f"r2_fold{rec['fold']}": r2.get(gene)})
    order = {g: i for i, g in enumerate(dict.fromkeys(g for _, g in table))}  # genes as first met
    rows = sorted(table.values(), key=lambda row: (row["method"], order[row["gene"]]))
    for row in rows:
        p = [v for k, v in row.items() if k.startswith("pcc_fold") and v is not None]
        r = [v for k, v in row.items() if k.startswith("r2_fold") and v is not None]
        row.update(pcc_mean=float(np.mean(p)) if p else None, r2_mean=float(np.mean(r)) if r else None,
                   n_folds=len(p))
    return rows


def _by_level(plan: Any, rows: list[dict[str, Any]], methods: list[str]) -> str:
    """Per-gene PCC by fifths of expression level under a cohort's table; each row gains its gene's level.

    Nothing when the genes differ between folds (no one list to split)."""
    if plan.genes is None or not rows:
        return ""
    level = expression_level(plan.slides.values(), plan.genes)
    at = dict(zip(map(str, plan.genes), level.tolist()))
    for row in rows:
        row["expression_level"] = at.get(str(row["gene"]))
    return ("\n\nPer-gene PCC by the genes' expression level (mean over all spots of the cohort of "
            "normalize_total(1e4) + log1p; descriptive, the same for every method): mean over folds and genes.\n\n"
            + per_gene_by_level(rows, plan.genes, level, methods=methods))


def run_accuracy(
    cohorts: Sequence[str | Path],
    out_dir: str | Path,
    *,
    methods: Sequence[str] = ("hist", "mean", "ridge"),
    genes: str = "hvg:2000",
    folds: int = 4,
    seed: int = 0,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    group_by: str | None = None,
    baseline_options: Mapping[str, Mapping[str, Any]] | None = None,
    write_predictions: bool = True,
    progress: bool = True,
    reuse: bool = True,
    rerun: Sequence[str] = (),
    reuse_from: Sequence[str | Path] = (),
    command: str | None = None,
    train_seed: int | None = None,
    only_folds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run Table 2 on one or more prepared cohorts.

    Args:
        cohorts: Prepared cohort folders (``<slide>.h5ad`` + ``cohort.json``).
        out_dir: Output folder (layout in the module docstring).
        methods: ``hist`` and/or baseline names (`hist_st.methods.list_methods`).
        genes: Gene spec, ``hvg:N`` or ``he:N`` (highly expressed), from each cohort's manifest ranking.
        folds: Number of folds (by slide unless ``group_by``).
        seed: Fold seed and, unless ``train_seed`` is given, every method's training seed.
        config, overrides: HiST `TrainConfig` YAML and ``key=value`` overrides.
        group_by: Group column for folds (e.g. ``patient``); None = by slide (the paper).
        baseline_options: Per-baseline keyword options, e.g. ``{"stflow": {"epochs": 50}}``.
        write_predictions: Write HiST's test predictions (needed by ``hist-st plot genes``).
        progress: Progress bars.
        reuse: Take each (method, fold) computed earlier with the same key (method options, folds, genes,
            seed, slide contents: `hist_st.evaluate.cache`) from ``out_dir``'s cache instead of training it,
            so a method can be added to a finished table without retraining the rest.
        rerun: Methods to train again even when cached (e.g. after a code change that alters a baseline).
        reuse_from: Other `run_accuracy` output folders (e.g. one slow baseline run on its own, or on a GPU
            machine) whose caches are searched too; each row copied whole names its source in
            ``reused_from``. Not used for methods in ``rerun`` or when ``reuse`` is False.
        command: The command line that made this run, recorded in ``accuracy.json``.
        train_seed: Every method's training seed when it differs from the fold seed (`run_accuracy_seeds`
            repeats training with several seeds on the folds of one fold seed).
        only_folds: Run only these folds of the split (numbers from 0; None: all). The table then covers
            those folds alone and says so; a later run without it takes them from this folder's cache
            (``reuse_from``), so one slow method can be spread over machines fold by fold.

    Returns:
        ``{"cohorts": {name: {"methods": {display name: summarise_folds(...)}, "seconds": {...},
        "devices": {display name: device that trained it}, "reused_from": {display name: source folder},
        "run_dir": str, "n_genes": int}}, "table": str,
        "out_dir": str, "genes": spec, "methods": [...]}``.
    """
    methods = check_methods(methods)
    if not cohorts:
        raise InputError("--cohort", "give at least one prepared cohort folder")
    fold_seed, t_seed = int(seed), int(seed if train_seed is None else train_seed)
    cfg = build_config(config, overrides, seed=t_seed, genes=genes, progress=progress)
    out, baseline_options = Path(out_dir), dict(baseline_options or {})  # made by run_cv (a bad cohort: none)
    results, tables, per_gene = {}, [], {}  # per cohort: summary, Markdown table, per-gene rows
    # train_seed is recorded only when it differs from the fold seed, so earlier runs stay comparable.
    recorded_train_seed = None if t_seed == fold_seed else t_seed
    for src in reuse_from:
        if not (Path(src) / "accuracy.json").is_file():
            raise InputError(src, "not a `hist-st bench accuracy` output folder (no accuracy.json)")
    again = {display(m) for m in check_methods(rerun)} if rerun else set()
    cache = ResultCache(reuse_from) if reuse else None  # one index of reuse_from's entries for every cohort
    for name, cohort in zip(_cohort_names(cohorts), cohorts):
        cohort, run_dir, t0 = Path(cohort), out / name, time.perf_counter()
        plan = make_plan(cohort, cfg.genes, k=folds, seed=fold_seed, group_by=group_by, embedding=cfg.embedding)
        plan = plan.only(only_folds) if only_folds is not None else plan
        info = init_distributed(cfg.device) if "hist" in methods else None
        res = run_cv(plan, build_methods(methods, cfg, baseline_options, dist_info=info), run_dir, seed=cfg.seed,
                     write_predictions=write_predictions, dist_info=info, progress=progress, retrain=again,
                     cache=cache)
        ordered = {label: m.summary for label, m in res.methods.items()}  # the user's method order
        reused_from = {label: str(Path(m.reused_from).parent) for label, m in res.methods.items() if m.reused_from}
        devices = {label: _device(m, label, reused_from.get(label), name, cfg, baseline_options)
                   for m, label in zip(methods, res.methods)}
        n_genes = len(plan.genes) if plan.genes is not None else None
        seconds = {label: float(m.seconds) for label, m in res.methods.items()}
        results[name] = {"methods": ordered, "seconds": seconds, "run_dir": str(run_dir), "cohort": str(cohort),
                         "n_genes": n_genes, "devices": devices, "reused_from": reused_from,
                         "wall_seconds": time.perf_counter() - t0}
        seeds_label = f"seed {seed}" if recorded_train_seed is None else f"fold seed {seed}, training seed {t_seed}"
        if plan.only_folds:
            seeds_label += f"; folds {', '.join(map(str, plan.only_folds))} only"
        per_gene[name] = per_gene_rows(run_dir)
        tables.append(f"### {name} ({genes}, {n_genes} genes, {folds}-fold, {seeds_label})\n\n" + format_table(ordered)
                      + _by_level(plan, per_gene[name], list(ordered)))
    table = f"{PROTOCOLS} Mean ± std over folds (ddof 0).\n\n" + "\n\n".join(tables) + "\n"
    (out / "table.md").write_text(table)
    rows = pd.DataFrame([{"cohort": name, **row} for name, by_gene in per_gene.items() for row in by_gene])
    fold_cols = sorted((c for c in rows if c.startswith(("pcc_fold", "r2_fold"))),
                       key=lambda c: (int(c.split("fold")[1]), c))
    rows.reindex(columns=["cohort", "method", "gene", "expression_level", "pcc_mean", "r2_mean", "n_folds",
                          *fold_cols]).to_csv(
        out / "per_gene.csv", index=False, lineterminator="\r\n")  # CRLF, as the csv module writes
    summary = {"cohorts": results, "table": table, "out_dir": str(out), "genes": genes, "methods": methods,
               "folds": folds, "only_folds": None if only_folds is None else sorted(set(map(int, only_folds))),
               "seed": seed, "train_seed": recorded_train_seed, "group_by": group_by,
               "config": config_to_dict(cfg), "baseline_options": baseline_options, "command": command}
    write_json(summary, out / "accuracy.json")
    return summary
