"""``hist-st bench``: accuracy (Table 2), efficiency (Table 1, Figure 3), speed, host, encoder, tissue,
uncertainty, superres and subspot; the work is done by `hist_st.experiments` and `hist_st.bench`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from hist_st.bench.encoder import encoder_bench, format_encoder
from hist_st.bench.host import HER2ST, format_host, host_overhead
from hist_st.bench.speed import DEFAULT_GENES, DEFAULT_SPOTS, run_speed_bench
from hist_st.bench.tissue import run_tissue_bench, tissue_markdown
from hist_st.cli import OUT, Arg, arg, command, ints, names, show
from hist_st.cli import experiments as ex
from hist_st.errors import InputError
from hist_st.jsonio import write_json
from hist_st.memory import parse_malloc
from hist_st.model.hist import GRAD_CHECKPOINTING
from hist_st.train.config import RENAMED, config_from_dict, parse_overrides

JSON_OUT = arg("--out", type=Path, help="write the result as JSON here")
PLOT_GENES = arg("--plot-genes", type=names,
                 help="comma-separated genes of the map figure (default: the 2 most variable on its slide)")


def _int_list(value: str | None, option: str, what: str) -> list[int] | None:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (None stays None), else an `InputError` naming ``option``."""
    try:
        return None if value is None else list(ints(value))
    except ValueError:
        raise InputError(option, f"{value!r} is not a comma-separated list of {what}") from None


@command(
    "bench accuracy", OUT, ex.METHODS, ex.GROUP_BY, ex.BASELINE_OPTION,
    arg("--cohort", required=True, action="append", type=Path, help="prepared cohort (repeatable)"),
    arg("--no-predictions", action="store_true", help="do not write HiST's test predictions"),
    arg("--force", action="store_true", help="rerun every method (default: reuse identical cached results)"),
    arg("--rerun", type=names, metavar="METHODS", help="comma-separated methods to train again anyway"),
    arg("--reuse-from", action="append", type=Path, metavar="DIR", help="another `bench accuracy` output "
        "folder whose cache is searched too, e.g. one method run on a GPU (repeatable)"),
    arg("--seeds", metavar="S1,S2,...", help="training seeds, e.g. 0,1,2: every method once per seed on the "
        "folds of --seed; means over seeds, paired per-fold differences to HiST (OUT/seed_<s>)"),
    arg("--paired-with", action="append", type=Path, metavar="DIR", help="with --seeds: another --seeds "
        "output folder (same seeds and folds); HiST here minus HiST there, per fold (repeatable)"),
    arg("--only-folds", metavar="I,J,...", help="run only these folds of the split (from 0), e.g. a slow method "
        "on several machines; a later run with --reuse-from DIR takes them from this folder's cache"),
    *ex.experiment_args(),
    help="Table 2: every method on identical folds, both metric protocols")
def cmd_accuracy(args: argparse.Namespace) -> None:
    from hist_st.experiments.accuracy import run_accuracy
    from hist_st.experiments.seeds import run_accuracy_seeds

    seeds = _int_list(args.seeds, "--seeds", "integers (e.g. 0,1,2)")
    only = _int_list(args.only_folds, "--only-folds", "fold numbers (e.g. 2,3)")
    if args.paired_with and seeds is None:
        raise InputError("--paired-with", "compares runs over training seeds: give --seeds too (e.g. 0,1,2)")
    kw = dict(vars(ex.experiment_setup(args)), methods=args.methods, reuse=not args.force,
              baseline_options=ex.parse_baseline_options(args.baseline_option), rerun=args.rerun or [],
              write_predictions=not args.no_predictions, reuse_from=args.reuse_from or [],
              only_folds=only, command="hist-st " + shlex.join(sys.argv[1:]))
    if seeds is None:
        res = run_accuracy(args.cohort, args.out, **kw)
        files = "accuracy.json, table.md, per_gene.csv, per-fold metrics.json"
    else:
        res = run_accuracy_seeds(args.cohort, args.out, seeds=seeds, paired_with=args.paired_with or [], **kw)
        files = "seeds.json, table.md; one bench accuracy folder per seed: seed_<s>"
    show(res["table"], f"{res['out_dir']} ({files})")


@command(
    "bench efficiency", OUT, ex.METHODS, ex.BASELINE_OPTION,
    arg("--device", default="auto", help="auto, cpu or cuda"),
    arg("--cohort", type=Path, help="prepared cohort (default: synthetic slides)"),
    arg("--epochs", type=int, default=2, help="epochs timed for methods with epochs (default 2)"),
    arg("--spots", type=int, default=2000, help="spots per synthetic slide for Table 1 (default 2000)"),
    arg("--n-genes", type=int, default=2000, help="genes of the synthetic slides for Table 1 (default 2000)"),
    arg("--threads", type=int, default=0, help="torch threads per worker (0 = default)"),
    arg("--timeout", type=float, default=3600.0, help="seconds per method and size before giving up"),
    arg("--no-table", action="store_true", help="skip Table 1 (e.g. only --scaling)"),
    arg("--scaling", action="store_true", help="also produce Figure 3 on synthetic slides"),
    arg("--scaling-spots", type=ints, default="250,500,1000,2000,4000", help="spots along the spots axis"),
    arg("--scaling-genes", type=ints, default="50,250,1000,2000", help="genes along the genes axis"),
    arg("--fixed-genes", type=int, default=250, help="genes while spots vary (default 250)"),
    arg("--fixed-spots", type=int, default=1000, help="spots while genes vary (default 1000)"),
    *ex.experiment_args(),
    help="Table 1 (time, peak memory per method) and Figure 3 (scaling)",
    description="Each method is timed in its own process on a cohort's fold-0 split or on synthetic slides.")
def cmd_efficiency(args: argparse.Namespace) -> None:
    from hist_st.bench.efficiency import SyntheticSlides, Workers, run_efficiency
    from hist_st.bench.scaling import run_scaling

    options = ex.parse_baseline_options(args.baseline_option)
    workers = Workers(methods=args.methods, epochs=args.epochs, seed=args.seed, config=args.config,
                      overrides=args.overrides, baseline_options=options, device=args.device,
                      threads=args.threads, timeout=args.timeout, progress=not args.no_progress)
    if not args.no_table:
        res = run_efficiency(args.out, workers=workers, cohort=args.cohort, genes=args.genes,
                             folds=args.folds, command="hist-st " + shlex.join(sys.argv[1:]),
                             synthetic=SyntheticSlides(n_spots=args.spots, n_genes=args.n_genes))
        print(f"{res['header']}\n{res['table']}")
    if args.scaling:
        sc = run_scaling(args.out / "scaling", workers=workers, spots=args.scaling_spots,
                         genes_list=args.scaling_genes, fixed_genes=args.fixed_genes,
                         fixed_spots=args.fixed_spots)
        print(f"Figure 3: {sc['figure']}")


@command(
    "bench speed",
    arg("--out", type=Path, default=Path("runs/bench-speed"), help="output folder"),
    arg("--spots", type=ints, help="spots N (default 500,2000,5000,20000,100000)"),
    arg("--genes", type=ints, help="genes G (default 250,1000,2000,4000)"),
    arg("--grid-mode", choices=["sweep", "full"], default="sweep",
        help="sweep: N at G=2000 and G at N=5000; full: every (N, G) pair"),
    arg("--modes", default="infer,train", help="infer and/or train"),
    arg("--max-train-spots", type=int, default=20000, help="largest N for train steps"),
    arg("--threads", type=int, default=2, help="torch CPU threads (default 2)"),
    arg("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda, see --precision)"),
    arg("--repeats", type=int, default=3, help="timed repeats after one warm-up (median)"),
    arg("--in-dim", type=int, default=1024, help="input embedding width (default 1024)"),
    arg("--lattice", dest="grid", choices=["square", "hex"], default="square",
        help="synthetic slide geometry: square (dense legacy-ST lattice) or hex (Visium, 55 um unit)"),
    arg("--model", action="append", metavar="KEY=VALUE", help="HiSTConfig override, e.g. dim=256"),
    arg("--train-option", action="append", metavar="KEY=VALUE",
        help="train config key of the train steps, e.g. optimizer_in_backward=true"),
    arg("--grad-checkpointing", choices=GRAD_CHECKPOINTING, default="none",
        help="recompute activations in backward (train steps): less memory, more time"),
    arg("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 autocast on CUDA, "
        "fp32 on the CPU; bf16: autocast on the CPU too (AMX); the head and loss stay float32"),
    arg("--malloc", default="default", help="allocator policy, as HIST_ST_MALLOC of hist-st train: default, "
        "fixed (256K) or fixed:SIZE (e.g. fixed:4M) and/or trim (after every step), comma-separated"),
    arg("--json", action="store_true", help="print one JSON line per setting"),
    help="train-step / inference time, peak memory and FLOP/s vs spots and genes",
    description="Each setting runs in a fresh subprocess (so its peak memory is its own) and times a dense "
    "fp32 matmul beside the model, reporting the model's achieved fraction of it.")
def cmd_speed(args: argparse.Namespace) -> None:
    modes = tuple(names(args.modes))
    if not modes or set(modes) - {"infer", "train"}:
        raise InputError("--modes", f"{args.modes!r}: give infer and/or train, comma-separated")
    settings = {k: getattr(args, k) for k in ("threads", "device", "repeats", "in_dim", "grid",
                                              "grad_checkpointing", "precision", "malloc")}  # SpeedSettings
    train = parse_overrides(args.train_option, "--train-option", "optimizer_in_backward=true")
    model = parse_overrides(args.model, "--model", "dim=256")
    for key in model:
        if f"model.{key}" in RENAMED:
            raise InputError(f"--model {key}", RENAMED[f"model.{key}"].replace("model.", ""))
    config_from_dict({**train, "model": model})  # a bad key or value fails here, not in every worker
    parse_malloc(args.malloc, "--malloc")
    run_speed_bench(args.out, spots=args.spots or DEFAULT_SPOTS, genes=args.genes or DEFAULT_GENES,
                    grid_mode=args.grid_mode, modes=modes, max_train_spots=args.max_train_spots,
                    json_lines=args.json, model=model, train=train, **settings)
    plots = ", ".join(p.name for p in sorted(args.out.glob("speed_vs_*.png"))) or "none (one size per axis)"
    print(f"results in {args.out}/speed.json; plots: {plots}")


@command(
    "bench host",
    arg("--her2st", type=Path, default=HER2ST, help="her2st folder (default %(default)s)"),
    arg("--section", default="C3", help="her2st section (default C3)"),
    arg("--spots", type=int, default=200, help="spots of the synthetic fallback slide"),
    arg("--dim", type=int, default=32, help="model width (default 32)"),
    arg("--heads", type=int, default=4, help="attention heads (default 4)"),
    arg("--genes", type=int, default=250, help="genes (default 250)"),
    arg("--steps", type=int, default=60, help="timed steps (default 60)"),
    arg("--threads", type=int, default=1, help="torch threads (default 1)"), JSON_OUT,
    help="host cost per phase of one training step on a small slide with a tiny model")
def cmd_host(args: argparse.Namespace) -> None:
    r = host_overhead(section=args.section, root=args.her2st, spots=args.spots, dim=args.dim,
                      heads=args.heads, genes=args.genes, steps=args.steps, threads=args.threads)
    print(format_host(r))
    if args.out is not None:
        write_json(r, args.out)


@command(
    "bench encoder",
    arg("--encoder", default="efficientnet-lite0"),
    arg("--weights", help="encoder weights file"),
    arg("--device", default="cpu", help="cpu or cuda"),
    arg("--threads", type=int, default=2, help="torch threads (default 2)"),
    arg("--batch-sizes", type=ints, default=(32, 64), help="comma-separated (default 32,64)"),
    arg("--precisions", type=names, default="fp32,bf16", help="fp32 and/or bf16 (default both; cuda: bf16)"),
    arg("--rounds", type=int, default=4, help="timed rounds (default 4)"),
    arg("--no-pipeline", action="store_true", help="skip the patch-cutting pipeline rows"),
    arg("--her2st", type=Path, default=HER2ST, help="her2st folder for real patches"), JSON_OUT,
    help="patch encoder throughput (patches/s) and cosine to fp32 per precision and batch size")
def cmd_encoder(args: argparse.Namespace) -> None:
    r = encoder_bench(encoder=args.encoder, weights=args.weights, device=args.device, threads=args.threads,
                      batch_sizes=args.batch_sizes, precisions=tuple(args.precisions), rounds=args.rounds,
                      pipeline=not args.no_pipeline, root=args.her2st)
    print(format_encoder(r))
    if args.out is not None:
        write_json(r, args.out)


@command(
    "bench tissue",
    arg("--her2st", type=Path, help="her2st-layout folder (sections with images)"),
    arg("--spaceranger", nargs="*", type=Path, help="Space Ranger outs/ folder(s)"),
    arg("--out", type=Path, default=Path("runs/bench-tissue"), help="output folder (tissue.json)"),
    help="tissue detection vs her2st / Space Ranger labels; fiducials; non-tissue images")
def cmd_tissue(args: argparse.Namespace) -> None:
    if args.her2st is None and not args.spaceranger:
        raise InputError("hist-st bench tissue", "give --her2st DIR and/or --spaceranger OUTS ...")
    res = run_tissue_bench(her2st=args.her2st, spaceranger=args.spaceranger or [], out=args.out)
    show(tissue_markdown(res), args.out / "tissue.json")


@command(
    "bench uncertainty",
    arg("--run", nargs="+", required=True, type=Path, help="cross-validation run folder(s) with splits.json "
        "and fold_<i>/model.pt; several runs with other seeds on the same folds form the ensemble"),
    arg("--cohort", required=True, type=Path, help="the prepared cohort of those runs"),
    arg("--out", type=Path, default=Path("runs/uncertainty"), help="output folder"),
    arg("--mc-samples", type=int, default=20, help="MC-dropout passes per slide"),
    arg("--seed", type=int, default=0, help="seed of the MC-dropout passes"),
    help="calibration of MC-dropout and seed-ensemble std on held-out folds")
def cmd_uncertainty(args: argparse.Namespace) -> None:
    from hist_st.experiments.uncertainty import run_uncertainty, uncertainty_markdown

    if args.mc_samples < 2:
        raise InputError("--mc-samples", f"must be >= 2 to estimate a spread, got {args.mc_samples}")
    res = run_uncertainty(args.run, args.cohort, args.out, mc_samples=args.mc_samples, seed=args.seed)
    show(uncertainty_markdown(res), f"{args.out}: uncertainty.json, calibration.png")


def fold_args(cohort: str, force: str) -> list[Arg]:
    """Options of ``bench superres`` / ``subspot`` (gene set he:250 by default)."""
    return [OUT, PLOT_GENES, arg("--cohort", required=True, type=Path, help=cohort),
            arg("--force", action="store_true", help=force), *ex.experiment_args(genes="he:250")]


def _fold_run_options(args: argparse.Namespace) -> dict[str, Any]:
    """What `run_superres` and `run_subspot` take alike from their command lines."""
    return dict(setup=ex.experiment_setup(args), plot_genes=args.plot_genes or None, reuse=not args.force)


@command(
    "bench superres",
    *fold_args("prepared cohort (spot level)", "retrain every model (default: keep identical fold runs)"),
    arg("--block", type=int, default=2, help="block side in spots (default 2: 2x2 blocks)"),
    arg("--sigma", type=float, default=0.5,
        help="Gaussian interpolation width as a fraction of the coarse pitch (default 0.5)"),
    help="super-resolution: train on 2x2 blocks of spots, score on the spots",
    description="Train HiST on block x block sums of spots (supervise=coarse<k>), score it on the spots "
    "beside a coarse model copied to the spots, its Gaussian interpolation and HiST trained on the spots.")
def cmd_superres(args: argparse.Namespace) -> None:
    from hist_st.experiments.superres import run_superres, superres_markdown

    res = run_superres(args.cohort, args.out, block=args.block, sigma_fraction=args.sigma,
                       command="hist-st " + shlex.join(sys.argv[1:]), **_fold_run_options(args))
    show(superres_markdown(res), f"{args.out}: superres.json, table.md, {res['figure']}")


@command(
    "bench subspot",
    *fold_args("prepared legacy-ST cohort with images", "recompute sub-spot embeddings and retrain"),
    arg("--fold", type=int, default=0, help="which fold to run (default 0)"),
    arg("--factor", type=int, default=2, help="sub-cells per side of a spot (default 2)"),
    help="sub-spot tokens: f x f patches per legacy-ST spot, supervised by the spots",
    description="Train HiST on sub-spot tokens supervised by the spots, on one fold; score the sub-spots "
    "summed per spot beside HiST trained on the spots (fold_<i>/spot, shared with bench superres); map them.")
def cmd_subspot(args: argparse.Namespace) -> None:
    from hist_st.experiments.superres import run_subspot

    res = run_subspot(args.cohort, args.out, fold=args.fold, factor=args.factor, **_fold_run_options(args))
    lines = [f"{name}: per-gene PCC {s['per_gene']['pcc']['mean']:.3f}, pooled PCC "
             f"{s['pooled']['pcc']['mean']:.3f}, pooled R2 {s['pooled']['r2']['mean']:.3f}"
             for name, s in res["scores"].items()]
    lines.append(f"within-spot position effect of the sub-spot map: {res['position_effect']:.3f}")
    show("\n".join(lines), f"{args.out}: subspot_fold{args.fold}.json, {res['figure']}")
