"""One markdown table of several HiST ablations, each a `bench accuracy --seeds ... --paired-with DEFAULT` run.

Each row is one ablation folder; each cell its paired per-fold difference to the default run it was paired
with (ablation minus default: mean over folds of the seed-mean difference, the std over seeds of the
fold-mean difference, and the folds where the ablation is at or above the default), then the per-fold
seed-mean differences and the ablation's own means.

Usage: ``python scripts/ablation_table.py [--cohort her2st] ABLATION_DIR [ABLATION_DIR ...]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hist_st.bench import markdown_table
from hist_st.experiments.seeds import METRICS, SEEDS_FILE
from hist_st.jsonio import read_json


def _cell(d: dict) -> str:
    return f"{d['mean']:+.3f} (seeds ± {d['seed_std']:.3f}; {d['folds_ahead']}/{d['n_folds']})"


def _folds(d: dict) -> str:
    return " / ".join(f"{v:+.3f}" for v in d["per_fold"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--cohort", default="her2st")
    args = ap.parse_args()
    labels = [label for _, _, label in METRICS if label != "per-gene R2"]
    rows, fold_rows, means = [], [], []
    for run in args.runs:
        rec = read_json(run / SEEDS_FILE)
        seeds = rec["cohorts"][args.cohort]
        (diffs,) = seeds["paired_with"].values()   # one --paired-with per ablation run
        name = f"`{run.name}` (seeds {','.join(map(str, seeds['seeds']))})"
        rows.append([name, *(_cell(diffs[label]) if label in diffs else "—" for label in labels)])
        fold_rows.append([name, *(_folds(diffs[label]) if label in diffs else "—" for label in labels)])
        means.append([name, *(f"{seeds['methods'][rec['reference']][label]['mean']:.3f}"
                              if label in seeds['methods'][rec['reference']] else "—" for label in labels)])
    for title, body in (("ablation minus default: mean over folds (seeds ± std; folds at or above)", rows),
                        ("per fold (seed means), in fold order", fold_rows),
                        ("the ablation's own means over folds and seeds", means)):
        print("", title, "", *markdown_table(["ablation", *labels], body), sep="\n")

if __name__ == "__main__":
    main()
