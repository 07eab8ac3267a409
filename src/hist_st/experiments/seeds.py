"""Table 2 over several training seeds: rows are means over seeds, with the seed spread and paired
per-fold differences.

```python
from hist_st.experiments.seeds import run_accuracy_seeds
res = run_accuracy_seeds(["cohorts/her2st"], "runs/acc3", seeds=[0, 1, 2], methods=["hist", "bleep"])
print(res["table"])
```

Every seed trains every method on the same folds (those of the fold seed, ``seed``), genes, targets and
embeddings; only the training seed changes. Each seed is one `run_accuracy` run in ``OUT/seed_<s>`` (the
seed equal to the fold seed is an ordinary single-seed run, so it can be copied from one with
``reuse_from``). For each method and metric, with ``V[s, f]`` the value of seed ``s`` on fold ``f``:

- **row**: ``m_f = mean_s V[s, f]``, shown as ``mean_f m_f ± std_f m_f`` (over folds, as in Table 2);
- **seed spread**: ``std_s (mean_f V[s, f])``, how much the table's mean moves with the training seed;
- **paired difference** to a reference method ``R``: ``D[s, f] = V_R[s, f] - V[s, f]``, shown as
  ``mean ± std over folds`` of ``mean_s D[s, f]``, the seed spread ``std_s (mean_f D[s, f])`` and the
  number of folds (of K) where ``mean_s D[s, f] >= 0``.

Standard deviations use ddof 0 (`hist_st.metrics.STD_DDOF`), like every table of the project.

Layout of ``OUT``: ``seed_<s>/`` (`run_accuracy` folders), ``seeds.json`` (per method and metric: the
``[S, K]`` values, row, seed spread, paired differences) and ``table.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.bench import markdown_table
from hist_st.errors import InputError
from hist_st.experiments.accuracy import display, run_accuracy
from hist_st.jsonio import read_json, write_json
from hist_st.metrics import STD_DDOF
from hist_st.train.folds import load_folds

__all__ = ["METRICS", "run_accuracy_seeds", "seed_summary", "paired_differences", "format_seed_tables"]

#: (protocol, key, column label) of the metrics summarised over seeds.
METRICS = (("pooled", "r2", "pooled R2"), ("pooled", "pcc", "pooled PCC"), ("per_gene", "pcc", "per-gene PCC"),
           ("per_gene", "r2", "per-gene R2"), ("maps", "pcc", "map PCC"))


#: The summary file of a `run_accuracy_seeds` folder.
SEEDS_FILE = "seeds.json"


def seed_summary(values: np.ndarray) -> dict[str, Any]:
    """Row statistics of ``values [S seeds, K folds]``.

    Returns:
        ``{"mean", "std"}`` over folds of the per-fold seed means, ``"seed_std"`` (std over seeds of the
        fold mean), ``"fold_means"`` ``[K]``, ``"seed_means"`` ``[S]``, ``"values"`` ``[S][K]``.
    """
    fold_means, seed_means = values.mean(0), values.mean(1)
    return {"mean": float(fold_means.mean()), "std": float(fold_means.std(ddof=STD_DDOF)),
            "seed_std": float(seed_means.std(ddof=STD_DDOF)), "fold_means": fold_means.tolist(),
            "seed_means": seed_means.tolist(), "values": values.tolist()}


def paired_differences(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """Paired per-fold differences ``reference - other`` of two ``[S, K]`` value arrays (same seeds, folds).

    Returns:
        ``{"mean", "std"}`` over folds of the seed-mean difference, ``"seed_std"`` (std over seeds of the
        fold-mean difference), ``"per_fold"`` ``[K]`` seed-mean differences, ``"folds_ahead"`` (folds
        where the reference is at or above ``other``), ``"n_folds"``.
    """
    if reference.shape != other.shape:
        raise ValueError(f"paired differences need equal shapes, got {reference.shape} and {other.shape}")
    d = reference - other
    per_fold = d.mean(0)
    return {"mean": float(per_fold.mean()), "std": float(per_fold.std(ddof=STD_DDOF)),
            "seed_std": float(d.mean(1).std(ddof=STD_DDOF)), "per_fold": per_fold.tolist(),
            "folds_ahead": int((per_fold >= 0).sum()), "n_folds": int(d.shape[1])}


def _cell(stat: Mapping[str, Any]) -> str:
    mean, std = stat["mean"], stat["std"]
    if not np.isfinite(mean):
        return "n/a (non-finite)"
    if mean < -999:
        return "< -999"
    return f"{mean:.3f} ± {std:.3f} (seeds ± {stat['seed_std']:.3f})"


def _diff_cell(d: Mapping[str, Any]) -> str:
    if not np.isfinite(d["mean"]):
        return "n/a"
    if abs(d["mean"]) > 999:
        return "> 999 in size"
    return f"{d['mean']:+.3f} ± {d['std']:.3f} (seeds ± {d['seed_std']:.3f}; {d['folds_ahead']}/{d['n_folds']})"


def _table(first: str, rows: Mapping[str, Mapping[str, Any]], cell: Callable[[Mapping[str, Any]], str]) -> list[str]:
    """Markdown lines: a header (``first``, then the `METRICS` labels) and one row per name, ``cell`` of each."""
    labels = [label for _, _, label in METRICS]
    return markdown_table([first, *labels], ([name, *(cell(v[label]) if label in v else "—" for label in labels)]
                                             for name, v in rows.items()))


def format_seed_tables(cohort: str, rec: Mapping[str, Any], reference: str | None) -> str:
    """Markdown: the mean-over-seeds table and, when ``reference`` is a method, its paired differences (to the
    other methods, and to ``reference`` in other runs: ``rec["paired_with"]``)."""
    lines = [f"### {cohort}: mean over training seeds {', '.join(map(str, rec['seeds']))}", "",
             "Cell: mean ± std over folds of the per-fold mean over seeds (seeds ± std over seeds of the "
             "fold mean).", "", *_table("Method", rec["methods"], _cell)]
    if reference is not None and rec.get("paired"):
        lines += ["", f"Paired per-fold differences, {reference} minus method: mean ± std over folds of the "
                  "seed-mean difference (seeds ± std over seeds of the fold-mean difference; folds where "
                  f"{reference} is at or above the method).", "", *_table("Method", rec["paired"], _diff_cell)]
    if reference is not None and rec.get("paired_with"):
        lines += ["", f"Paired per-fold differences, {reference} of this run minus {reference} of another "
                  "run (this run's seeds, same folds): mean ± std over folds of the seed-mean difference "
                  "(seeds ± std over seeds; folds where this run is at or above the other).", "",
                  *_table("Other run", {f"`{k}`": v for k, v in rec["paired_with"].items()}, _diff_cell)]
    return "\n".join(lines) + "\n"


def paired_with_runs(
    rec: Mapping[str, Any], out: Path, name: str, others: Sequence[str | Path], method: str = "HiST"
) -> dict[str, Any]:
    """Paired differences of ``method`` in this seeds run (``rec``, cohort ``name``, folder ``out``) minus the
    same method in other `run_accuracy_seeds` folders (e.g. a HiST ablation against the default).

    The other run must hold every training seed of this run (it may hold more; only this run's seeds are
    paired) and the same folds (``splits.json`` of each seed).

    Raises:
        InputError: When a folder is not a seeds run, lacks the cohort or method, or used other seeds/folds.
    """
    def fold_sets(path: Path) -> list[tuple[frozenset[str], frozenset[str]]]:
        return [(frozenset(f["train"]), frozenset(f["test"])) for f in load_folds(path)]

    result: dict[str, Any] = {}
    mine = {label: np.array(stat["values"]) for label, stat in rec["methods"][method].items()}
    for other in map(Path, others):
        if not (other / SEEDS_FILE).is_file():
            raise InputError(other, "not a `bench accuracy --seeds` folder (no seeds.json)")
        orec = read_json(other / SEEDS_FILE).get("cohorts", {}).get(name)
        if orec is None or method not in orec.get("methods", {}):
            raise InputError(other, f"has no {method} results for cohort {name!r}")
        missing = [x for x in rec["seeds"] if x not in orec["seeds"]]
        if missing:
            raise InputError(other, f"trained with seeds {orec['seeds']}, lacks seed(s) {missing} of this run")
        rows = [list(orec["seeds"]).index(x) for x in rec["seeds"]]
        for s in rec["seeds"]:
            if fold_sets(other / f"seed_{s}" / name / "splits.json") != fold_sets(out / f"seed_{s}" / name / "splits.json"):
                raise InputError(other, f"seed {s} used other folds than this run")
        theirs = {label: np.array(orec["methods"][method][label]["values"])[rows]
                  for label in mine if label in orec["methods"][method]}  # older runs lack map PCC
        result[str(other)] = {label: paired_differences(mine[label], theirs[label]) for label in theirs}
    return result


def _sources_for_seed(reuse_from: Sequence[str | Path], seed: int) -> list[Path]:
    """The `run_accuracy` folders of ``reuse_from`` for training seed ``seed``: a seeds folder's
    ``seed_<seed>`` (none when it lacks that seed), any other folder as it is."""
    out = []
    for folder in map(Path, reuse_from):
        if (folder / f"seed_{seed}").is_dir():
            out.append(folder / f"seed_{seed}")
        elif not (folder / SEEDS_FILE).is_file():
            out.append(folder)
    return out


def run_accuracy_seeds(
    cohorts: Sequence[str | Path],
    out_dir: str | Path,
    *,
    seeds: Sequence[int],
    seed: int = 0,
    methods: Sequence[str] = ("hist", "mean", "ridge"),
    reference: str | None = "hist",
    reuse_from: Sequence[str | Path] = (),
    paired_with: Sequence[str | Path] = (),
    command: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`hist_st.experiments.accuracy.run_accuracy` once per training seed, summarised over seeds.

    Args:
        cohorts: Prepared cohort folders.
        out_dir: Output folder (layout in the module docstring).
        seeds: Training seeds (at least one; duplicates are an error).
        seed: Fold seed, the same for every training seed.
        methods: Methods, as for `run_accuracy`.
        reference: Method whose paired differences to every other method are reported (None: none;
            ignored when not among ``methods``).
        reuse_from: Other output folders to copy identical methods from: `run_accuracy` folders, or
            `run_accuracy_seeds` folders (their ``seed_<s>`` subfolder is used for seed ``s``; one without
            that seed gives nothing to it, so runs of one seed each can be merged).
        paired_with: Other `run_accuracy_seeds` folders (same seeds and folds, e.g. HiST with another
            config): paired differences of ``reference`` here minus ``reference`` there (`paired_with_runs`).
        command: The command line, recorded in ``seeds.json``.
        **kwargs: Passed to `run_accuracy` (genes, folds, config, overrides, baseline options, ...).

    Returns:
        ``{"cohorts": {name: {"seeds", "methods": {display: {label: seed_summary}}, "paired": {display:
        {label: paired_differences}}}}, "table": str, "out_dir": str, "runs": {seed: run_accuracy result}}``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("--seeds", "give at least one training seed, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise InputError("--seeds", f"repeated training seed in {seeds}")
    out = Path(out_dir)
    runs: dict[int, dict[str, Any]] = {}
    for s in seeds:
        runs[s] = run_accuracy(cohorts, out / f"seed_{s}", methods=methods, seed=seed, train_seed=s,
                               reuse_from=_sources_for_seed(reuse_from, s), command=command, **kwargs)
    first = runs[seeds[0]]
    ref = display(reference) if reference in first["methods"] else None
    cohorts_out: dict[str, Any] = {}
    for name in first["cohorts"]:
        per_seed = [runs[s]["cohorts"][name]["methods"] for s in seeds]
        values = {m: {label: np.array([run[m][p][k]["values"] for run in per_seed], dtype=np.float64)
                      for p, k, label in METRICS if all(k in run[m].get(p, {}) for run in per_seed)}
                  for m in per_seed[0]}  # [S, K] per method and metric (map PCC: not in records older than it)
        rec: dict[str, Any] = {
            "seeds": seeds, "fold_seed": seed,
            "methods": {m: {label: seed_summary(v) for label, v in by_label.items()}
                        for m, by_label in values.items()},
            "paired": {m: {label: paired_differences(values[ref][label], v) for label, v in by_label.items()
                           if label in values[ref]}
                       for m, by_label in values.items() if ref is not None and m != ref}}
        if paired_with and ref is not None:
            rec["paired_with"] = paired_with_runs(rec, out, name, paired_with, ref)
        cohorts_out[name] = rec
    table = "\n".join(format_seed_tables(name, rec, ref) for name, rec in cohorts_out.items())
    (out / "table.md").write_text(table)
    runs_out = {str(s): str(out / f"seed_{s}") for s in seeds}
    write_json({"cohorts": cohorts_out, "seeds": seeds, "fold_seed": seed, "methods": list(methods),
                "reference": ref, "command": command, "runs": runs_out}, out / SEEDS_FILE)
    return {"cohorts": cohorts_out, "table": table, "out_dir": str(out), "runs": runs}
