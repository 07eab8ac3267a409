"""``hist-st demo``: synthetic cohort -> 4-fold CV of HiST and a ridge probe -> Table-2 style report."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from hist_st.demo import run_demo

    result = run_demo(
        args.out, n_slides=args.slides, epochs=args.epochs, folds=args.folds, seed=args.seed,
        overrides=list(args.overrides), progress=not args.no_progress, threads=args.threads,
    )
    print(result["header"])
    print()
    print(result["table"])
    s = result["seconds"]
    print(f"\nwall time {s['total']:.0f} s (HiST {s['HiST']:.0f} s, ridge {s['ridge']:.1f} s); "
          f"outputs in {result['out_dir']}: table.md, loss_curves.png, heatmap.png, cv/")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="synthetic cohort, 4-fold CV of HiST vs ridge, Table-2 style report",
                              description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--slides", type=int, default=None, help="number of synthetic slides (default 8)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 30)")
    p.add_argument("--folds", type=int, default=None, help="CV folds (default 4)")
    p.add_argument("--seed", type=int, default=None, help="cohort and training seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra TrainConfig overrides")
    p.set_defaults(func=cmd_demo)
