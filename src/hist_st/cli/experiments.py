"""``hist-st ablate``, ``stain``, ``tokens``, ``plot genes`` and ``report``: thin wrappers over
`hist_st.experiments`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from hist_st.cli.bench import add_command, add_experiment_args, experiment_setup, parse_baseline_options
from hist_st.errors import InputError


def _list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _command(sub: argparse._SubParsersAction, name: str, func: Any, *, paths: dict[str, str], **kw: Any
             ) -> argparse.ArgumentParser:
    """`add_command` plus required path options ``--<name>`` (``paths``: name -> help)."""
    p = add_command(sub, name, func, **kw)
    for flag, text in paths.items():
        p.add_argument(f"--{flag}", required=True, type=Path, help=text)
    return p


def _show(res: dict) -> int:
    """Print an experiment's table and where its results are."""
    print(res["table"])
    print(f"results in {res['out_dir']}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from hist_st.experiments.ablation import ABLATIONS, run_ablation

    if args.list:
        for a in ABLATIONS.values():
            print(f"{a.name:14s} {a.group or '-'}: {a.label}")
        return 0
    if args.cohort is None or args.out is None:
        raise InputError("--cohort/--out", "hist-st ablate needs both (or --list)")
    return _show(run_ablation(args.cohort, args.out, setup=experiment_setup(args), names=_list(args.configs),
                              skip_done=not args.force))


def prepare_pair(prepare_args: list[str], plain: Path, macenko: Path) -> None:
    """``hist-st prepare PREPARE_ARGS --out PLAIN`` and the same with ``--stain-norm macenko --out MACENKO``
    (resumable: finished slides are skipped on a rerun).

    Raises:
        InputError: ``--out`` or ``--stain-norm`` among the arguments, or a preparation that fails.
    """
    from hist_st.cli import main

    if any(a in ("--out", "--stain-norm") or a.startswith(("--out=", "--stain-norm=")) for a in prepare_args):
        raise InputError("--prepare", "give the prepare arguments without --out and --stain-norm")
    for out, extra in ((plain, ["--stain-norm", "none"]), (macenko, ["--stain-norm", "macenko"])):
        rc = main(["prepare", *prepare_args, *extra, "--out", str(out)])
        if rc not in (0, None):
            raise InputError(out, f"hist-st prepare exited with status {rc}")


def cmd_stain(args: argparse.Namespace) -> int:
    from hist_st.experiments.stain import run_stain

    if args.prepare:
        prepare_pair(shlex.split(args.prepare), args.plain, args.macenko)
    return _show(run_stain(args.plain, args.macenko, args.out, setup=experiment_setup(args), skip_done=not args.force,
                           rows=_list(args.rows) or ("macenko-only", "token-only", "both", "neither")))


def cmd_tokens(args: argparse.Namespace) -> int:
    from hist_st.experiments.tokens import run_token_analysis

    res = run_token_analysis(args.run, args.cohort, args.out, group_by=_list(args.group_by) or ["patient"],
                             source=args.source)
    print(res["table"])
    print("figures: " + ", ".join(res["figures"]))
    return 0


def cmd_plot_genes(args: argparse.Namespace) -> int:
    import json

    from hist_st.pl import map_agreement, plot_genes
    from hist_st.slide import read_prepared

    genes = _list(args.genes) or []
    out = args.out or Path(args.pred).with_suffix("").as_posix() + "_genes.png"
    pred = read_prepared(args.pred)
    truth = read_prepared(args.truth) if args.truth else None
    path = plot_genes(pred, genes, out, truth=truth, values=args.values)
    if truth is not None or pred.counts is not None:  # how the maps compare with the measured ones
        print(json.dumps(map_agreement(pred, genes, args.values, truth=truth), indent=1))
    print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hist_st.experiments.report import ReportSpec, build_report

    command = "hist-st " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    path = build_report(ReportSpec(
        args.name or Path(args.cohort).resolve().name, args.cohort, docs_dir=args.docs, runs_dir=args.runs,
        methods=_list(args.methods), gene_sets=_list(args.gene_sets), folds=args.folds, seed=args.seed,
        config=args.config, overrides=args.overrides, baseline_options=parse_baseline_options(args.baseline_option),
        ablations=_list(args.ablations) if args.ablations != "none" else [], ablation_epochs=args.ablation_epochs,
        efficiency=not args.no_efficiency, efficiency_epochs=args.efficiency_epochs,
        efficiency_also=args.efficiency_also or [], reuse_from=args.reuse_from or [], scaling=args.scaling,
        macenko=args.macenko, scaling_options={"spots": [int(v) for v in _list(args.scaling_spots)],
                                               "genes_list": [int(v) for v in _list(args.scaling_genes)],
                                               "timeout": args.scaling_timeout},
        token_groups=_list(args.token_groups), device=args.device, command=command, force=args.force,
        progress=not args.no_progress))
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "ablate", cmd_ablate, help="Table 3: component ablations of HiST on the same folds",
                    description="Cross-validate each named ablation config (see --list) on identical folds and "
                    "genes; writes table.md with fold std and the paper's direction.", shared=("group-by",))
    p.add_argument("--cohort", type=Path, default=None, help="prepared cohort")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--configs", default=None, help="comma-separated ablation names (default: all; see --list)")
    p.add_argument("--force", action="store_true", help="retrain ablations whose results are cached")
    p.add_argument("--list", action="store_true", help="list the ablation names and exit")
    add_experiment_args(p)

    p = _command(subparsers, "stain", cmd_stain, shared=("out",), help="Table 5: calibration token vs Macenko stain "
                 "normalisation", description="Cross-validate token-only / Macenko-only / both (and neither) on the "
                 "same folds and genes. Give two prepared cohorts, or --prepare to make them.",
                 paths={"plain": "cohort prepared without stain normalisation",
                        "macenko": "the same slides prepared with --stain-norm macenko"})
    p.add_argument("--prepare", default=None,
                   help="hist-st prepare arguments (quoted, without --out/--stain-norm) to prepare both cohorts first")
    p.add_argument("--rows", default=None, help="rows to run: macenko-only,token-only,both,neither (default all)")
    p.add_argument("--force", action="store_true", help="retrain rows whose results are cached")
    add_experiment_args(p)

    p = _command(subparsers, "tokens", cmd_tokens, help="Table 6 / Figure 4: calibration-token analysis of a CV run",
                 description="Export each slide's final calibration token from the fold models of a cv / bench "
                 "accuracy run and measure how well it separates groups.", shared=("out",),
                 paths={"run": "cross-validation run directory (splits.json, fold_<i>/model.pt)",
                        "cohort": "the prepared cohort of that run"})
    p.add_argument("--group-by", default="patient", help="comma-separated metadata columns (patient, technology, ...)")
    p.add_argument("--source", default="test", help="'test' (held-out fold model per slide) or 'fold:<i>'")

    p = subparsers.add_parser("plot", help="figures (plot genes: H&E, measured and predicted expression)")
    psub = p.add_subparsers(dest="plot_command", required=True, metavar="FIGURE")
    g = psub.add_parser("genes", help="expression maps over the H&E: measured (when known), predicted, MC std")
    g.add_argument("--pred", required=True, type=Path, help="prediction file (hist-st predict / cv output)")
    g.add_argument("--genes", required=True, help="comma-separated genes")
    g.add_argument("--truth", type=Path, default=None, help="prepared slide with the measured counts (optional)")
    g.add_argument("--values", default="normalised", choices=("normalised", "log1p", "counts"),
                   help="normalised: log1p of counts per 10k over the model's genes (library size removed)")
    g.add_argument("--out", type=Path, default=None, help="PNG path (default: next to --pred)")
    g.set_defaults(func=cmd_plot_genes)

    p = add_command(subparsers, "report", cmd_report, help="run every experiment on a cohort and write "
                    "docs/results/<name>.md", usage="hist-st report --cohort DIR [--name NAME] [options] [KEY=VALUE ...]",
                    description="Tables 1, 2, 3 (and 5), the token analysis and figures in one Markdown file that "
                    "quotes this command; finished steps are reused unless --force.",
                    shared=("methods", "baseline-option"))
    # The name is an option, not a positional: argparse cannot take a positional before options and trailing
    # KEY=VALUE overrides after them.
    p.add_argument("--name", default=None, help="report name, e.g. her2st (default: the cohort folder's name)")
    p.add_argument("--cohort", required=True, type=Path, help="prepared cohort")
    p.add_argument("--docs", type=Path, default=Path("docs/results"), help="Markdown folder (default docs/results)")
    p.add_argument("--runs", type=Path, default=None, help="run folder (default runs/report-<name>)")
    p.add_argument("--gene-sets", default="hvg:2000,he:250", help="comma-separated gene sets for Table 2")
    p.add_argument("--ablations", default=None, help="comma-separated ablations (default all; 'none' to skip)")
    p.add_argument("--ablation-epochs", type=int, default=None, help="epochs of every Table 3 row (default: as Table 2)")
    p.add_argument("--no-efficiency", action="store_true", help="skip Table 1")
    p.add_argument("--efficiency-epochs", type=int, default=2, help="epochs timed per method for Table 1")
    p.add_argument("--efficiency-also", action="append", type=Path, metavar="DIR",
                   help="a `hist-st bench efficiency` output folder measured elsewhere (e.g. on a GPU) to show under "
                   "Table 1 (repeatable)")
    p.add_argument("--reuse-from", action="append", type=Path, metavar="DIR",
                   help="a `hist-st bench accuracy` output folder whose cache Table 2 also searches: its methods "
                   "are copied in when they used the same cohort, folds, genes and options, e.g. a slow baseline "
                   "run separately (repeatable)")
    p.add_argument("--scaling", action="store_true", help="also produce Figure 3 (synthetic slides)")
    p.add_argument("--scaling-spots", default="250,500,1000,2000,4000", help="Figure 3: spots per slide")
    p.add_argument("--scaling-genes", default="50,250,1000,2000", help="Figure 3: genes (at 1,000 spots)")
    p.add_argument("--scaling-timeout", type=float, default=1800.0,
                   help="Figure 3: seconds per method and size; a method that times out is not run at larger sizes")
    p.add_argument("--macenko", type=Path, default=None, help="Macenko-normalised copy of the cohort (Table 5)")
    p.add_argument("--token-groups", default="patient", help="metadata columns for the token analysis")
    p.add_argument("--device", default="auto", help="device for the efficiency table")
    p.add_argument("--force", action="store_true", help="recompute steps whose results exist")
    add_experiment_args(p, genes=False)
