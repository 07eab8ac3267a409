"""``hist-st demo``, ``ablate``, ``stain``, ``tokens``, ``plot genes`` and ``report``: thin wrappers over
`hist_st.demo` and `hist_st.experiments`; the options they share with ``hist-st bench``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from hist_st.cli import CONFIG, GENE_SET, NO_PROGRESS, OUT, Arg, arg, command, ints, main, names, show
from hist_st.errors import InputError
from hist_st.pl import map_agreement, plot_genes
from hist_st.slide import read_prepared
from hist_st.train.config import parse_overrides

METHODS = arg("--methods", type=names, default="hist,mean,depth,ridge,mlp,bleep,stnet,stflow", help="method names")
GROUP_BY = arg("--group-by", help="fold by a group column (e.g. patient) instead of by slide")
BASELINE_OPTION = arg("--baseline-option", action="append", metavar="METHOD.KEY=VALUE",
                      help="baseline option, e.g. stflow.epochs=50 (repeatable)")


def experiment_args(genes: str | None = "hvg:2000") -> list[Arg]:
    """Options of the experiment commands: gene set (None: no ``--genes``), folds, seed, HiST config."""
    return [*([arg("--genes", default=genes, help=GENE_SET)] if genes else []),
            arg("--folds", type=int, default=4, help="number of folds, by slide (default 4)"),
            arg("--seed", type=int, default=0, help="fold and training seed (default 0)"), *CONFIG]


def experiment_setup(args: argparse.Namespace) -> Any:
    """The `CVSetup` of `experiment_args`' options (and ``--group-by`` where the command has it)."""
    from hist_st.experiments.accuracy import CVSetup

    return CVSetup(**{k: getattr(args, k) for k in ("genes", "folds", "seed", "config", "overrides")},
                   group_by=getattr(args, "group_by", None), progress=not args.no_progress)


def parse_baseline_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["stflow.epochs=50", "bleep.top_k=5"]`` -> ``{"stflow": {"epochs": 50}, "bleep": {"top_k": 5}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_overrides(items, "--baseline-option", "stflow.epochs=50").items():
        name, dot, opt = key.partition(".")
        if not dot:
            raise InputError("--baseline-option", f"{key!r}: give METHOD.KEY=VALUE, e.g. stflow.epochs=50")
        out.setdefault(name, {})[opt] = value
    return out


@command(
    "demo",
    arg("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)"),
    arg("--slides", type=int, help="number of synthetic slides (default 8)"),
    arg("--epochs", type=int, help="training epochs (default 30)"),
    arg("--folds", type=int, help="CV folds (default 4)"),
    arg("--seed", type=int, help="cohort and training seed (default 0)"),
    arg("--threads", type=int, help="torch CPU threads"), NO_PROGRESS,
    arg("overrides", nargs="*", metavar="KEY=VALUE", help="extra TrainConfig overrides"),
    help="synthetic cohort, 4-fold CV of HiST vs ridge, Table-2 style report")
def cmd_demo(args: argparse.Namespace) -> None:
    from hist_st.demo import run_demo

    res = run_demo(args.out, n_slides=args.slides, epochs=args.epochs, folds=args.folds, seed=args.seed,
                   overrides=list(args.overrides), progress=not args.no_progress, threads=args.threads)
    s = res["seconds"]
    print(f"{res['header']}\n\n{res['table']}\n\nwall time {s['total']:.0f} s (HiST {s['HiST']:.0f} s, ridge "
          f"{s['ridge']:.1f} s); outputs in {res['out_dir']}: table.md, loss_curves.png, heatmap.png, cv/")


@command(
    "ablate", GROUP_BY,
    arg("--cohort", type=Path, help="prepared cohort"), arg("--out", type=Path, help="output folder"),
    arg("--configs", type=names, help="comma-separated ablation names (default: all; see --list)"),
    arg("--force", action="store_true", help="retrain ablations whose results are cached"),
    arg("--list", action="store_true", help="list the ablation names and exit"), *experiment_args(),
    help="Table 3: component ablations of HiST on the same folds")
def cmd_ablate(args: argparse.Namespace) -> None:
    from hist_st.experiments.ablation import ABLATIONS, run_ablation

    if args.list:
        print("\n".join(f"{a.name:14s} {a.group or '-'}: {a.label}" for a in ABLATIONS.values()))
    elif args.cohort is None or args.out is None:
        raise InputError("--cohort/--out", "hist-st ablate needs both (or --list)")
    else:
        res = run_ablation(args.cohort, args.out, setup=experiment_setup(args), names=args.configs,
                           skip_done=not args.force)
        show(res["table"], res["out_dir"])


@command(
    "stain", OUT,
    arg("--plain", required=True, type=Path, help="cohort prepared without stain normalisation"),
    arg("--macenko", required=True, type=Path, help="the same slides prepared with --stain-norm macenko"),
    arg("--prepare", help="hist-st prepare arguments (quoted, no --out/--stain-norm) to prepare both first"),
    arg("--rows", type=names, help="rows to run: macenko-only,token-only,both,neither (default all)"),
    arg("--force", action="store_true", help="retrain rows whose results are cached"), *experiment_args(),
    help="Table 5: calibration token vs Macenko stain normalisation",
    description="Cross-validate token-only / Macenko-only / both (and neither) on the same folds and genes. "
    "Give two prepared cohorts, or --prepare to make them.")
def cmd_stain(args: argparse.Namespace) -> None:
    from hist_st.experiments.stain import run_stain

    setup = experiment_setup(args)
    rows = args.rows or ("macenko-only", "token-only", "both", "neither")
    if args.prepare:  # hist-st prepare ARGS --out PLAIN, then --stain-norm macenko --out MACENKO (resumable)
        given = shlex.split(args.prepare)
        if any(a in ("--out", "--stain-norm") or a.startswith(("--out=", "--stain-norm=")) for a in given):
            raise InputError("--prepare", "give the prepare arguments without --out and --stain-norm")
        for out, norm in ((args.plain, "none"), (args.macenko, "macenko")):
            rc = main(["prepare", *given, "--stain-norm", norm, "--out", str(out)])
            if rc not in (0, None):
                raise InputError(out, f"hist-st prepare exited with status {rc}")
    res = run_stain(args.plain, args.macenko, args.out, setup=setup, rows=rows, skip_done=not args.force)
    show(res["table"], res["out_dir"])


@command(
    "tokens", OUT,
    arg("--run", required=True, type=Path, help="cross-validation run (splits.json, fold_<i>/model.pt)"),
    arg("--cohort", required=True, type=Path, help="the prepared cohort of that run"),
    arg("--group-by", type=names, default="patient", help="metadata columns, e.g. patient,technology"),
    arg("--source", default="test", help="'test' (held-out fold model per slide) or 'fold:<i>'"),
    help="Table 6 / Figure 4: calibration-token analysis of a CV run")
def cmd_tokens(args: argparse.Namespace) -> None:
    from hist_st.experiments.tokens import run_token_analysis

    res = run_token_analysis(args.run, args.cohort, args.out, group_by=args.group_by or ["patient"],
                             source=args.source)
    print(f"{res['table']}\nfigures: {', '.join(res['figures'])}")


@command(
    "plot genes",
    arg("--pred", required=True, type=Path, help="prediction file (hist-st predict / cv output)"),
    arg("--genes", required=True, type=names, help="comma-separated genes"),
    arg("--truth", type=Path, help="prepared slide with the measured counts (optional)"),
    arg("--values", default="normalised", choices=("normalised", "log1p", "counts"),
        help="normalised: log1p of counts per 10k over the model's genes (library size removed)"),
    arg("--out", type=Path, help="PNG path (default: next to --pred)"),
    help="expression maps over the H&E: measured (when known), predicted, MC std")
def cmd_plot_genes(args: argparse.Namespace) -> None:
    pred = read_prepared(args.pred)
    truth = read_prepared(args.truth) if args.truth else None
    path = plot_genes(pred, args.genes, args.out or args.pred.with_suffix("").as_posix() + "_genes.png",
                      truth=truth, values=args.values)
    if truth is not None or pred.counts is not None:  # how the maps compare with the measured ones
        print(json.dumps(map_agreement(pred, args.genes, args.values, truth=truth), indent=1))
    print(path)


@command(
    "report", METHODS, BASELINE_OPTION,
    # The name is an option: argparse takes no positional before options and trailing KEY=VALUE overrides.
    arg("--name", help="report name, e.g. her2st (default: the cohort folder's name)"),
    arg("--cohort", required=True, type=Path, help="prepared cohort"),
    arg("--docs", type=Path, default=Path("docs/results"), help="Markdown folder (default docs/results)"),
    arg("--runs", type=Path, help="run folder (default runs/report-<name>)"),
    arg("--gene-sets", type=names, default="hvg:2000,he:250", help="comma-separated gene sets for Table 2"),
    arg("--ablations", type=names, help="comma-separated ablations (default all; 'none' to skip)"),
    arg("--ablation-epochs", type=int, help="epochs of every Table 3 row (default: as Table 2)"),
    arg("--no-efficiency", action="store_true", help="skip Table 1"),
    arg("--efficiency-epochs", type=int, default=2, help="epochs timed per method for Table 1"),
    arg("--efficiency-also", action="append", type=Path, metavar="DIR", help="a `hist-st bench efficiency` "
        "folder measured elsewhere (e.g. on a GPU), shown under Table 1 (repeatable)"),
    arg("--reuse-from", action="append", type=Path, metavar="DIR", help="a `hist-st bench accuracy` folder "
        "whose cache Table 2 also searches for identically computed methods (repeatable)"),
    arg("--scaling", action="store_true", help="also produce Figure 3 (synthetic slides)"),
    arg("--scaling-spots", type=ints, default="250,500,1000,2000,4000", help="Figure 3: spots per slide"),
    arg("--scaling-genes", type=ints, default="50,250,1000,2000", help="Figure 3: genes (at 1,000 spots)"),
    arg("--scaling-timeout", type=float, default=1800.0,
        help="Figure 3: seconds per method and size; a method that times out is not run at larger sizes"),
    arg("--macenko", type=Path, help="Macenko-normalised copy of the cohort (Table 5)"),
    arg("--token-groups", type=names, default="patient", help="metadata columns for the token analysis"),
    arg("--device", default="auto", help="device for the efficiency table"),
    arg("--force", action="store_true", help="recompute steps whose results exist"),
    *experiment_args(genes=None),
    help="run every experiment on a cohort and write docs/results/<name>.md",
    usage="hist-st report --cohort DIR [--name NAME] [options] [KEY=VALUE ...]")
def cmd_report(args: argparse.Namespace) -> None:
    from hist_st.experiments.report import ReportSpec, build_report

    cmdline = "hist-st " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    print(build_report(ReportSpec(
        args.name or args.cohort.resolve().name, args.cohort, docs_dir=args.docs, runs_dir=args.runs,
        methods=args.methods, gene_sets=args.gene_sets, folds=args.folds, seed=args.seed, config=args.config,
        overrides=args.overrides, baseline_options=parse_baseline_options(args.baseline_option),
        ablations=[] if args.ablations == ["none"] else args.ablations, ablation_epochs=args.ablation_epochs,
        efficiency=not args.no_efficiency, efficiency_epochs=args.efficiency_epochs,
        efficiency_also=args.efficiency_also or [], reuse_from=args.reuse_from or [], scaling=args.scaling,
        scaling_options={"spots": args.scaling_spots, "genes_list": args.scaling_genes,
                         "timeout": args.scaling_timeout},
        macenko=args.macenko, token_groups=args.token_groups, device=args.device, force=args.force,
        progress=not args.no_progress, command=cmdline)))
