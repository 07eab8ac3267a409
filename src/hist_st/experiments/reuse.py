"""When may an experiment reuse an earlier run instead of training again?

A cross-validation run directory (written by `hist_st.evaluate.run_cv`) records what made it:
``config.yaml``, ``splits.json`` (with the cohort folder) and ``genes.txt``. An earlier run stands in for
a new one only when all three are the same; otherwise the experiment trains again. Two uses:

- `run_accuracy` adds methods to an existing Table 2 without retraining the methods already there
  (`reusable_methods`), and merges the new per-fold metrics into the same files (`merge_runs`); it also
  takes methods from other accuracy runs of the same cohort, folds, genes and options (``reuse_from``),
  e.g. one slow baseline run on its own or on a GPU machine;
- Table 5 takes its "calibration token only" row from Table 2's HiST run and its "neither" row from
  Table 3's ``no-token`` row when they were trained identically (`same_run`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hist_st.evaluate import PROTOCOLS, Plan, run_cv
from hist_st.jsonio import read_json, to_jsonable, write_json
from hist_st.methods import HiSTMethod
from hist_st.metrics import format_table
from hist_st.train.config import config_to_dict, load_config

__all__ = ["config_signature", "same_folds", "same_run", "reused_note", "reusable_methods", "merge_runs", "hist_rows"]

#: Config keys that change how a run is shown, not what it computes.
_COSMETIC = ("progress", "num_workers", "checkpoint_every")


def config_signature(cfg: Any) -> dict[str, Any]:
    """A `TrainConfig` (or its dict) as a comparable dict, without cosmetic keys and the gene selection
    (genes are compared through ``genes.txt``)."""

    d = dict(cfg) if isinstance(cfg, Mapping) else config_to_dict(cfg)
    for k in (*_COSMETIC, "genes"):
        d.pop(k, None)
    return to_jsonable(d)


def _fold_sets(folds: Sequence[Mapping[str, Any]]) -> list[tuple[frozenset[str], frozenset[str]]]:
    return [(frozenset(f["train"]), frozenset(f["test"])) for f in folds]


def same_folds(run_dir: str | Path, folds: Sequence[Mapping[str, Any]], cohort: str | Path) -> bool:
    """True when ``run_dir/splits.json`` holds ``folds`` on the slides of ``cohort``."""
    path = Path(run_dir) / "splits.json"
    if not path.is_file():
        return False
    rec = read_json(path)
    src = rec.get("slides_dir")
    if src is None or Path(src).resolve() != Path(cohort).resolve():
        return False
    return _fold_sets(rec.get("folds", [])) == _fold_sets(folds)


def _same_genes(run_dir: Path, genes: Sequence[str]) -> bool:
    path = run_dir / "genes.txt"
    return path.is_file() and path.read_text().split() == list(genes)


def same_run(
    run_dir: str | Path, cfg: Any, folds: Sequence[Mapping[str, Any]], genes: Sequence[str], cohort: str | Path
) -> bool:
    """True when ``run_dir`` is a finished `run_cv` run of ``cfg`` on ``cohort`` with these folds and genes."""

    run_dir = Path(run_dir)
    if not ((run_dir / "metrics.json").is_file() and (run_dir / "config.yaml").is_file()):
        return False
    if not (same_folds(run_dir, folds, cohort) and _same_genes(run_dir, genes)):
        return False
    return config_signature(load_config(run_dir / "config.yaml")) == config_signature(cfg)


def reused_note(reused: Mapping[str, str]) -> str:
    """A Markdown line naming the rows taken from earlier, identically trained runs (empty when none)."""
    if not reused:
        return ""
    rows = "; ".join(f"`{k}` from `{v}`" for k, v in reused.items())
    return f"\nRows reused from runs with the same config, cohort, folds and genes (not retrained): {rows}.\n"


def reusable_methods(
    prior: Mapping[str, Any] | None,
    cohort_name: str,
    run_dir: str | Path,
    *,
    cfg: Any,
    methods: Sequence[str],
    settings: Mapping[str, Any],
    baseline_options: Mapping[str, Mapping[str, Any]],
    folds: Sequence[Mapping[str, Any]],
    genes: Sequence[str],
    cohort: str | Path,
) -> list[str]:
    """The methods of an earlier `run_accuracy` summary (``prior``) that need not be run again.

    A method is reusable when the earlier run used the same ``settings`` (gene spec, k, seed, group_by),
    cohort, folds and genes, and the same options: the HiST config for ``hist``, the keyword options for a
    baseline.
    """
    if not prior or any(prior.get(k) != v for k, v in settings.items()):
        return []
    rec = prior.get("cohorts", {}).get(cohort_name)
    run_dir = Path(run_dir)
    if rec is None or Path(rec.get("cohort", "")).resolve() != Path(cohort).resolve():
        return []
    if not (same_folds(run_dir, folds, cohort) and _same_genes(run_dir, genes)):
        return []
    done = rec.get("methods", {})
    old_options = prior.get("baseline_options", {}) or {}
    out = []
    for m in methods:
        if m == "hist":
            ok = "HiST" in done and config_signature(prior.get("config", {})) == config_signature(cfg)
        else:
            ok = m in done and to_jsonable(old_options.get(m, {})) == to_jsonable(baseline_options.get(m, {}))
        if ok:
            out.append(m)
    return out


def merge_runs(run_dir: str | Path, merged: Mapping[str, Any], kept_folds: Mapping[int, Mapping[str, Any]]) -> None:
    """Put kept methods' results into a run directory that was just (partly) rewritten, or that another run
    directory's methods are copied into.

    Args:
        run_dir: The `run_cv` directory.
        merged: ``{"methods": {name: summary}, "seconds": {name: s}}`` of every method, kept and new;
            written into ``run_dir/metrics.json``.
        kept_folds: fold index -> that fold's ``metrics.json`` record (``fold``, ``train``, ``test``,
            ``n_genes``) whose ``metrics`` hold only the kept methods. They are written into
            ``fold_<i>/metrics.json`` beside the methods already there, replacing older entries of the same
            name; a missing file is created from the record.
    """
    run_dir = Path(run_dir)
    for i, kept in kept_folds.items():
        path = run_dir / f"fold_{i}" / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        rec = read_json(path) if path.is_file() else {**kept, "metrics": {}}
        rec["metrics"] = {**rec["metrics"], **kept["metrics"]}
        write_json(rec, path)
    top = run_dir / "metrics.json"
    rec = read_json(top) if top.is_file() else {}
    for key in ("methods", "seconds"):
        rec[key] = {**rec.get(key, {}), **merged[key]}
    folds = sorted((read_json(p) for p in run_dir.glob("fold_*/metrics.json")), key=lambda f: int(f["fold"]))
    rec["folds"] = [{"fold": f["fold"], **{m: {"pooled": v["pooled"], "per_gene_pcc": v["per_gene"]["pcc"]}
                                           for m, v in f["metrics"].items()}} for f in folds]
    write_json(rec, top)
    (run_dir / "table.md").write_text(f"{PROTOCOLS} Mean ± std over {len(folds)} folds.\n\n"
                                      + format_table(rec["methods"]) + "\n")


def hist_rows(
    out: str | Path,
    rows: Mapping[str, tuple[Any, Callable[[], Plan], str | Path]],
    *,
    folds: Sequence[Mapping[str, Any]],
    genes: Sequence[str],
    name: str,
    skip_done: bool = True,
    equivalent: Mapping[str, str | Path] | None = None,
    dist_info: Any = None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The HiST rows of an experiment table (Table 3 or 5), each trained only when needed.

    A row is kept when ``out/<row>/metrics.json`` exists (``skip_done``), taken from ``equivalent[row]`` when
    that `run_cv` folder was trained identically (`same_run`), else trained: ``run_cv(plan, [HiST])``.

    Args:
        out: The experiment folder: ``<row>/`` run folders, ``<name>.json`` (summaries), ``reused.json``.
        rows: Row -> ``(TrainConfig, plan, cohort)``; ``plan()`` gives the row's `Plan` (called only when the
            row is trained), ``cohort`` is compared with ``equivalent``'s.
        folds, genes: The folds and genes every row shares.
        name: File name of the summaries (``ablation``, ``stain``).
        skip_done, equivalent, dist_info, progress: As above and in `hist_st.evaluate.run_cv`.

    Returns:
        ``(summaries, reused)``: row -> HiST's `summarise_folds` record; row -> the folder it was taken from.
    """
    out = Path(out)
    summaries: dict[str, Any] = {}
    reused: dict[str, str] = {}
    for row, (cfg, plan, cohort) in rows.items():
        run_dir = out / row
        source = (equivalent or {}).get(row)
        if skip_done and (run_dir / "metrics.json").is_file():
            summaries[row] = read_json(run_dir / "metrics.json")["methods"]["HiST"]
        elif source is not None and same_run(source, cfg, folds, genes, cohort):
            summaries[row], reused[row] = read_json(Path(source) / "metrics.json")["methods"]["HiST"], str(source)
        else:
            res = run_cv(plan(), [HiSTMethod(cfg, dist_info=dist_info)], run_dir, seed=cfg.seed,
                         write_predictions=False, dist_info=dist_info, progress=progress)
            summaries[row] = res["methods"]["HiST"]
    write_json(reused, out / "reused.json")
    return read_json(write_json(summaries, out / f"{name}.json")), reused
