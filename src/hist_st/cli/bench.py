"""``hist-st bench``: the benchmark command group (``accuracy``, ``efficiency``, ``speed``, ``host``, ``encoder``,
``tissue``, ``uncertainty``, ``superres``, ``subspot``).

Each subcommand is registered by a function ``register_<name>(bench_subparsers)`` listed in
`BENCH_COMMANDS`; the work is done by `hist_st.experiments` and `hist_st.bench`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from hist_st.cli.bench_speed import ints, register_speed
from hist_st.errors import InputError
from hist_st.train.config import parse_override


def _names(value: str | None) -> list[str]:
    """``"hist, ridge"`` -> ``["hist", "ridge"]``; None -> ``[]``."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_baseline_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["stflow.epochs=50", "bleep.top_k=50"]`` -> ``{"stflow": {"epochs": 50}, "bleep": {"top_k": 50}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, value = parse_override(item, "--baseline-option", "stflow.epochs=50")
        name, dot, opt = key.partition(".")
        if not dot:
            raise InputError("--baseline-option", f"{item!r} is not of the form METHOD.KEY=VALUE (e.g. stflow.epochs=50)")
        out.setdefault(name, {})[opt] = value
    return out


def add_experiment_args(p: argparse.ArgumentParser, *, genes: bool = True) -> None:
    """Options shared by the experiment commands: genes, folds, seed, HiST config and overrides."""
    if genes:
        p.add_argument("--genes", default="hvg:2000", help="gene set: hvg:N (top N HVGs) or he:N (N most expressed)")
    p.add_argument("--folds", type=int, default=4, help="number of folds, by slide (default 4)")
    p.add_argument("--seed", type=int, default=0, help="fold and training seed (default 0)")
    p.add_argument("--config", type=Path, default=None, help="HiST TrainConfig YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="HiST config overrides, e.g. epochs=100 model.dim=256")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def experiment_setup(args: argparse.Namespace) -> Any:
    """The `CVSetup` of ``add_experiment_args``' options (and ``--group-by`` where the command has it)."""
    from hist_st.experiments.accuracy import CVSetup

    return CVSetup(genes=args.genes, folds=args.folds, seed=args.seed, config=args.config, overrides=args.overrides,
                   group_by=getattr(args, "group_by", None), progress=not args.no_progress)


#: Options several commands share: key -> (flags, `add_argument` keywords); `add_command` adds them by key.
SHARED: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "out": (("--out",), {"required": True, "type": Path, "help": "output folder"}),
    "methods": (("--methods",), {"default": "hist,mean,ridge,mlp,bleep,stnet,stflow", "help": "comma-separated methods"}),
    "group-by": (("--group-by",), {"default": None, "help": "fold by a group column (e.g. patient) instead of by slide"}),
    "baseline-option": (("--baseline-option",), {"action": "append", "metavar": "METHOD.KEY=VALUE",
                                                 "help": "baseline option, e.g. stflow.epochs=50 (repeatable)"}),
    "device": (("--device",), {"default": "auto", "help": "auto, cpu or cuda"}),
    "plot-genes": (("--plot-genes",), {"default": None, "help": "comma-separated genes of the map figure "
                                       "(default: the 2 most variable on the figure's slide)"}),
}


def add_command(
    sub: argparse._SubParsersAction, name: str, func: Any, *, help: str, description: str | None = None,
    shared: tuple[str, ...] = (), **kw: Any,
) -> argparse.ArgumentParser:
    """A subcommand ``name`` that runs ``func(args)``, with the `SHARED` options named in ``shared``."""
    p = sub.add_parser(name, help=help, description=description, **kw)
    for key in shared:
        flags, opts = SHARED[key]
        p.add_argument(*flags, **opts)
    p.set_defaults(func=func)
    return p


def _done(text: str, *results: Path) -> int:
    """Print a command's ``text`` and the files it wrote; exit code 0."""
    print(text)
    print("results: " + ", ".join(map(str, results)))
    return 0


def _seeds(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InputError("--seeds", f"{value!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None


def cmd_accuracy(args: argparse.Namespace) -> int:
    from hist_st.experiments.accuracy import run_accuracy

    seeds = _seeds(args.seeds)
    if args.paired_with and seeds is None:
        raise InputError("--paired-with", "compares runs over training seeds: give --seeds too (e.g. --seeds 0,1,2)")
    kw = dict(methods=_names(args.methods), genes=args.genes, folds=args.folds, seed=args.seed, config=args.config,
              overrides=args.overrides, group_by=args.group_by,
              baseline_options=parse_baseline_options(args.baseline_option),
              write_predictions=not args.no_predictions, progress=not args.no_progress, reuse=not args.force,
              rerun=_names(args.rerun), reuse_from=args.reuse_from or [],
              command="hist-st " + shlex.join(sys.argv[1:]))
    if seeds is not None:
        from hist_st.experiments.seeds import run_accuracy_seeds

        res = run_accuracy_seeds(args.cohort, args.out, seeds=seeds, paired_with=args.paired_with or [], **kw)
        print(res["table"])
        print(f"results in {res['out_dir']} (seeds.json, table.md; one bench accuracy folder per seed: seed_<s>)")
        return 0
    res = run_accuracy(args.cohort, args.out, **kw)
    print(res["table"])
    print(f"results in {res['out_dir']} (accuracy.json, table.md, per_gene.csv, per-fold metrics.json)")
    return 0


def register_accuracy(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "accuracy", cmd_accuracy, help="Table 2: every method on identical folds, both metric protocols",
                    description="Cross-validate HiST and baselines on the same folds/genes/targets/embeddings; "
                    "writes accuracy.json, table.md, per_gene.csv and per-fold JSON.",
                    shared=("out", "methods", "group-by", "baseline-option"))
    p.add_argument("--cohort", required=True, action="append", type=Path, help="prepared cohort (repeatable)")
    p.add_argument("--no-predictions", action="store_true", help="do not write HiST's test predictions")
    p.add_argument("--force", action="store_true",
                   help="rerun every method (default: take each method and fold that was computed with the same "
                   "config, folds, genes, options and slides from the cache of --out)")
    p.add_argument("--rerun", default=None, metavar="METHODS",
                   help="comma-separated methods to train again although an earlier run could be kept")
    p.add_argument("--reuse-from", action="append", type=Path, metavar="DIR",
                   help="another `bench accuracy` output folder (e.g. one method run separately or on a GPU) "
                   "whose cache is searched too: its methods are copied in when they used the same cohort, folds, "
                   "genes and options (repeatable)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="training seeds, e.g. 0,1,2: every method is trained once per seed on the folds of --seed; "
                   "rows are means over seeds, with the seed spread and paired per-fold differences to HiST "
                   "(one bench accuracy folder per seed in OUT/seed_<s>)")
    p.add_argument("--paired-with", action="append", type=Path, metavar="DIR",
                   help="with --seeds: another --seeds output folder (same seeds and folds, e.g. HiST with another "
                   "config); reports HiST here minus HiST there, paired per fold (repeatable)")
    add_experiment_args(p)


def cmd_efficiency(args: argparse.Namespace) -> int:
    from hist_st.bench.efficiency import SyntheticSlides, Workers, run_efficiency
    from hist_st.bench.scaling import run_scaling

    workers = Workers(methods=_names(args.methods), epochs=args.epochs, seed=args.seed, overrides=args.overrides,
                      baseline_options=parse_baseline_options(args.baseline_option), device=args.device,
                      threads=args.threads, timeout=args.timeout, progress=not args.no_progress)
    if not args.no_table:
        res = run_efficiency(args.out, workers=workers, cohort=args.cohort, genes=args.genes, folds=args.folds,
                             synthetic=SyntheticSlides(n_spots=args.spots, n_genes=args.n_genes),
                             command="hist-st " + shlex.join(sys.argv[1:]))
        print(res["header"])
        print(res["table"])
    if args.scaling:
        sc = run_scaling(Path(args.out) / "scaling", workers=workers, spots=args.scaling_spots,
                         genes_list=args.scaling_genes, fixed_genes=args.fixed_genes, fixed_spots=args.fixed_spots)
        print(f"Figure 3: {sc['figure']}")
    return 0


def register_efficiency(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "efficiency", cmd_efficiency, help="Table 1 (time, peak memory per method) and Figure 3 "
                    "(scaling)", description="Each method is timed in its own process on the same slides: a prepared "
                    "cohort's fold-0 split (--cohort) or synthetic slides. --scaling adds Figure 3.",
                    shared=("out", "methods", "baseline-option", "device"))
    p.add_argument("--cohort", type=Path, default=None, help="prepared cohort (default: synthetic slides)")
    p.add_argument("--epochs", type=int, default=2, help="epochs timed for methods with epochs (default 2)")
    p.add_argument("--spots", type=int, default=2000, help="spots per synthetic slide for Table 1 (default 2000)")
    p.add_argument("--n-genes", type=int, default=2000, help="genes of the synthetic slides for Table 1 (default 2000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = default)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per method and size before giving up")
    p.add_argument("--no-table", action="store_true", help="skip Table 1 (e.g. only --scaling)")
    p.add_argument("--scaling", action="store_true", help="also produce Figure 3 on synthetic slides")
    p.add_argument("--scaling-spots", type=ints, default="250,500,1000,2000,4000",
                   help="spots per slide along the spots axis")
    p.add_argument("--scaling-genes", type=ints, default="50,250,1000,2000", help="genes along the genes axis")
    p.add_argument("--fixed-genes", type=int, default=250, help="genes while spots vary (default 250)")
    p.add_argument("--fixed-spots", type=int, default=1000, help="spots while genes vary (default 1000)")
    add_experiment_args(p)


def cmd_tissue(args: argparse.Namespace) -> int:
    from hist_st.bench.tissue import run_tissue_bench, tissue_markdown

    if args.her2st is None and not args.spaceranger:
        raise InputError("hist-st bench tissue", "give --her2st DIR and/or --spaceranger OUTS ...")
    res = run_tissue_bench(her2st=args.her2st, spaceranger=args.spaceranger or [], out=args.out)
    return _done(tissue_markdown(res), args.out / "tissue.json")


def register_tissue(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "tissue", cmd_tissue,
                    help="tissue detection vs her2st / Space Ranger labels; fiducials; non-tissue images",
                    description="Recall of labelled tissue spots, calls on glass and out-of-tissue spots, "
                    "pseudo-spots outside the Visium capture area (fiducial frame), refusal of noise/blank/photos.")
    p.add_argument("--her2st", type=Path, default=None, help="her2st-layout folder (sections with images)")
    p.add_argument("--spaceranger", nargs="*", type=Path, default=None, help="Space Ranger outs/ folder(s)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-tissue"), help="output folder (tissue.json)")


def cmd_uncertainty(args: argparse.Namespace) -> int:
    from hist_st.experiments.uncertainty import run_uncertainty, uncertainty_markdown

    if args.mc_samples < 2:
        raise InputError("--mc-samples", f"must be >= 2 to estimate a spread, got {args.mc_samples}")
    res = run_uncertainty(args.run, args.cohort, args.out, mc_samples=args.mc_samples, seed=args.seed)
    return _done(uncertainty_markdown(res), args.out / "uncertainty.json", args.out / "calibration.png")


def register_uncertainty(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "uncertainty", cmd_uncertainty,
                    help="calibration of MC-dropout and seed-ensemble std on held-out folds",
                    description="Spearman(std, |error|), Gaussian interval coverage and confident-decile "
                    "errors of MC dropout (first run) and of the ensemble of the runs' fold models.")
    p.add_argument("--run", nargs="+", required=True, type=Path,
                   help="cross-validation run folder(s) with splits.json and fold_<i>/model.pt; several runs "
                   "with other seeds on the same folds form the ensemble")
    p.add_argument("--cohort", required=True, type=Path, help="the prepared cohort of those runs")
    p.add_argument("--out", type=Path, default=Path("runs/uncertainty"), help="output folder")
    p.add_argument("--mc-samples", type=int, default=20, help="MC-dropout passes per slide")
    p.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout passes")


def _fold_run_options(args: argparse.Namespace) -> dict[str, Any]:
    """What `run_superres` and `run_subspot` take alike from their command lines."""
    return dict(setup=experiment_setup(args), plot_genes=_names(args.plot_genes) or None, reuse=not args.force)


def cmd_superres(args: argparse.Namespace) -> int:
    from hist_st.experiments.superres import run_superres, superres_markdown

    res = run_superres(args.cohort, args.out, block=args.block, sigma_fraction=args.sigma,
                       command="hist-st " + shlex.join(sys.argv[1:]), **_fold_run_options(args))
    return _done(superres_markdown(res), args.out / "superres.json", args.out / "table.md", args.out / res["figure"])


def _fold_command(sub: argparse._SubParsersAction, name: str, func: Any, *, help: str, description: str,
                  cohort: str, force: str) -> argparse.ArgumentParser:
    """``bench superres`` / ``subspot``: ``--out``, ``--plot-genes``, ``--cohort``, ``--force`` and the experiment
    options (genes he:250 by default)."""
    p = add_command(sub, name, func, shared=("out", "plot-genes"), help=help, description=description)
    p.add_argument("--cohort", required=True, type=Path, help=cohort)
    p.add_argument("--force", action="store_true", help=force)
    add_experiment_args(p)
    p.set_defaults(genes="he:250")
    return p


def register_superres(sub: argparse._SubParsersAction) -> None:
    p = _fold_command(sub, "superres", cmd_superres, help="super-resolution: train on 2x2 blocks of spots, score on the spots",
                      description="Aggregate each block x block group of neighbouring spots into one coarse spot, "
                      "train HiST on the coarse labels only (supervise=coarse<k>) and score its spot-level "
                      "predictions against the measured spots, beside (a) a coarse model copied to the spots, "
                      "(b) its Gaussian interpolation and (c) HiST trained on the spots.",
                      cohort="prepared cohort (spot level)",
                      force="retrain every model (default: keep finished identical fold runs)")
    p.add_argument("--block", type=int, default=2, help="block side in spots (default 2: 2x2 blocks)")
    p.add_argument("--sigma", type=float, default=0.5,
                   help="Gaussian interpolation width as a fraction of the coarse pitch (default 0.5)")


def cmd_subspot(args: argparse.Namespace) -> int:
    from hist_st.experiments.superres import run_subspot

    res = run_subspot(args.cohort, args.out, fold=args.fold, factor=args.factor, **_fold_run_options(args))
    lines = [f"{name}: per-gene PCC {s['per_gene']['pcc']['mean']:.3f}, pooled PCC {s['pooled']['pcc']['mean']:.3f}, "
             f"pooled R2 {s['pooled']['r2']['mean']:.3f}" for name, s in res["scores"].items()]
    lines.append(f"within-spot position effect of the sub-spot map: {res['position_effect']:.3f}")
    return _done("\n".join(lines), args.out / f"subspot_fold{args.fold}.json", args.out / res["figure"])


def register_subspot(sub: argparse._SubParsersAction) -> None:
    p = _fold_command(sub, "subspot", cmd_subspot,
                      help="sub-spot tokens: f x f patches per legacy-ST spot, supervised by the spots",
                      description="Train HiST on sub-spot tokens (patches at pitch / factor inside each spot's cell) "
                      "supervised by the measured spots, on one fold; score the sub-spots summed per spot against "
                      "the measured spots beside HiST trained on the spots (same --out as bench superres shares "
                      "fold_<i>/spot); map the sub-spot predictions.",
                      cohort="prepared legacy-ST cohort with images", force="recompute sub-spot embeddings and retrain")
    p.add_argument("--fold", type=int, default=0, help="which fold to run (default 0)")
    p.add_argument("--factor", type=int, default=2, help="sub-cells per side of a spot (default 2)")


# Subcommands of ``hist-st bench``: each ``register_<name>(sub)`` adds one.
BENCH_COMMANDS = [register_accuracy, register_efficiency, register_speed, register_tissue, register_uncertainty,
                  register_superres, register_subspot]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: accuracy (Table 2), efficiency (Table 1, Figure 3), speed, tissue",
                              description="Benchmark commands; see `hist-st bench COMMAND --help`.")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    for fn in BENCH_COMMANDS:
        fn(sub)
