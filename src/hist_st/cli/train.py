"""``hist-st prepare``, ``train``, ``cv`` and ``predict``: raw slides -> cohort -> HiST -> predictions.

Run as a script this module is ``hist-st train`` (``torchrun --nproc_per_node 2 -m hist_st.cli.train ...``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections import Counter
from pathlib import Path

from hist_st.cli import CONFIG, GENE_SET, NO_PROGRESS, arg, command, main, names, show
from hist_st.errors import InputError
from hist_st.pl import plot_genes
from hist_st.predict_image import predict_image
from hist_st.prepare import prepare_cohort
from hist_st.runtime import resolve_device, set_threads
from hist_st.sources import FORMATS, find_sources
from hist_st.train.checkpoint import finished_epochs, load_bundle, load_resume_state, resume_source
from hist_st.train.config import run_config, with_gene_set
from hist_st.train.loop import train
from hist_st.train.predict import predict_folder

SLIDES = arg("--slides", required=True, type=Path, help="folder of prepared slides (<id>.h5ad)")
RUN = arg("--out", required=True, type=Path, help="run directory")
IDS = arg("--ids", help="only these slide ids: comma-separated, or a file with one per line")
EACH = "one per --input (spaceranger/anndata)"


def LOG(message: str) -> None:  # noqa: N802 - a constant-like name, passed as ``log=``
    """Progress and warning lines on stderr, looked up when written (not bound at import: a redirected or
    replaced ``sys.stderr``, e.g. in a notebook or under pytest, is honoured)."""
    print(message, file=sys.stderr)


#: Options of train and cv: the HiST config, gene set and label level.
SETUP = [*CONFIG, arg("--genes", help=f"{GENE_SET}; default hvg:2000"),
         arg("--supervise-at", metavar="spot|coarse<k>", help="where the labels are: spot (default) or "
             "coarse<k>, e.g. coarse2: 2x2 blocks of spots, counts summed (super-resolution; key supervise)")]


def _ids(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = names(Path(value).read_text().replace("\n", ",") if Path(value).is_file() else value)
    if not items:
        raise InputError(value, "empty slide id list")
    dup = sorted(v for v, n in Counter(items).items() if n > 1)
    if dup:
        raise InputError("--ids", f"slide id(s) listed more than once: {', '.join(dup)}")
    return items


def _cfg(args: argparse.Namespace, base: dict | None = None):
    overrides = with_gene_set(args.overrides, args.genes)
    if args.supervise_at:
        overrides.append(f"supervise={args.supervise_at}")
    if args.no_progress:
        overrides.append("progress=false")
    return run_config(args.config, overrides, base=base)


@command(
    "prepare",
    arg("--format", required=True, choices=FORMATS, help="input layout"),
    arg("--input", required=True, nargs="+", help="her2st/hest: the data folder; spaceranger: outs/ "
        "folder(s); anndata: .h5ad file(s); or a CSV/TSV table (path, image, slide_id, patient, um_per_px)"),
    arg("--image", nargs="+", help=f"H&E image(s), {EACH}: full resolution or a Space Ranger hires/lowres "
        "image. Default: the folder's own, or those in the AnnData's uns['spatial']"),
    arg("--image-scale", nargs="+", type=float,
        help="image pixels per full-resolution pixel, one per --input (default: detected)"),
    arg("--allow-missing-image", action="store_true", help="skip slides without an H&E image"),
    arg("--slide-id", nargs="+", help=f"slide id(s), {EACH}"),
    arg("--patient", nargs="+", help=f"patient id(s), {EACH}"),
    arg("--sections", nargs="+", help="her2st section ids / HEST sample ids to include"),
    arg("--um-per-px", type=float, help="microns per full-resolution pixel (default: from spots or image)"),
    arg("--out", required=True, help="output cohort folder"),
    arg("--encoder", default="efficientnet-lite0", help="efficientnet-lite0, uni, or timm:<name>"),
    arg("--weights", help="encoder weights file (uni, timm:<name>)"),
    arg("--device", help="cpu, cuda, ... (default: cuda when available)"),
    arg("--patch-px", type=int, default=224, help="patch side in pixels"),
    arg("--patch-um-per-px", type=float, default=0.5, help="patch resolution (um per pixel)"),
    arg("--batch-size", type=int, default=32),
    arg("--encoder-precision", choices=["fp32", "bf16"], default="fp32",
        help="bf16: the encoder in bfloat16 on the CPU (faster; embeddings differ by bf16 rounding)"),
    arg("--stain-norm", choices=("none", "macenko"), default="none", help="stain normalisation (torchstain)"),
    arg("--stain-reference", help="reference H&E image for --stain-norm (default: torchstain's)"),
    arg("--gene-mapping", help="CSV/TSV of Ensembl id -> gene symbol"),
    arg("--hvg-scope", choices=("dataset", "train-only"), default="dataset"),
    arg("--train-slides", nargs="+", help="training slide ids for --hvg-scope train-only"),
    arg("--threads", type=int, help="torch CPU threads (default or 0: all cores)"),
    arg("--overwrite", action="store_true", help="re-prepare slides that are already done"),
    NO_PROGRESS,
    help="read slides, cut patches, embed them and harmonise genes into a cohort folder",
    description="Prepare a cohort: one <slide>.h5ad per slide plus cohort.json. Resumable: finished slides "
    "are skipped; embeddings are cached per slide and encoder.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
def cmd_prepare(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    sources = find_sources(args.format, args.input, images=args.image, image_scales=args.image_scale,
                           slide_ids=args.slide_id, patients=args.patient, um_per_px=args.um_per_px,
                           sections=args.sections)
    same_name = {k: v for k, v in vars(args).items() if k in inspect.signature(prepare_cohort).parameters}
    report = prepare_cohort(sources, args.out, **same_name, progress=not args.no_progress, log=LOG)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the merged report
        print(report.summary())
    if report.failed:
        return 3 if report.prepared or report.skipped_done else 1
    return 0


@command(
    "train", SLIDES, RUN, IDS,
    arg("--resume", action="store_true", help="continue the run in OUT (from OUT/resume.pt)"),
    arg("--resume-from", type=Path, help="continue from this resume.pt, run folder or older full checkpoint"),
    arg("--accept-changes", action="store_true", help="with --resume: continue although slides, "
        "augmentation, seed, amp or checkpointing differ (recorded in OUT/accepted_changes.json)"),
    arg("--overwrite", action="store_true", help="replace the checkpoint of an earlier run in OUT"),
    *SETUP,
    help="train HiST on a folder of prepared slides (writes OUT/model.pt)")
def cmd_train(args: argparse.Namespace) -> None:
    resume = args.resume_from
    if resume is None and args.resume:
        done = finished_epochs(args.out)
        if done is not None:
            print(f"the run in {args.out} already finished all {done} epochs; nothing to resume")
            return
        resume = resume_source(args.out)
    base = dict(load_resume_state(resume)["config"]) if resume is not None else None
    result = train(_cfg(args, base), args.slides, slide_ids=_ids(args.ids), out_dir=args.out, resume=resume,
                   accept_changes=args.accept_changes, overwrite=args.overwrite)
    if result.checkpoint is not None:  # master process only
        last = result.history[-1] if result.history else {}
        print(f"trained on {len(result.slide_ids)} slides, {len(result.bundle.genes)} genes; "
              f"final loss {last.get('loss', float('nan')):.4f}; checkpoint: {result.checkpoint}")


@command(
    "cv", SLIDES, RUN,
    arg("--folds", type=int, default=4, help="number of folds (default 4)"),
    arg("--group-by", help="group column, e.g. patient (default: folds by slide)"),
    arg("--splits", type=Path, help="use the folds of this splits.json"), IDS,
    arg("--baselines", type=names, default="", help="baselines on the same folds, e.g. ridge,mean"),
    arg("--mc-samples", type=int, default=0, help="MC-dropout passes for predicted_std (default 0)"),
    arg("--no-predictions", action="store_true", help="do not write prediction files"),
    *SETUP,
    help="k-fold cross-validation (HiST and baselines, both protocols)")
def cmd_cv(args: argparse.Namespace) -> None:
    from hist_st.evaluate import cross_validate

    cfg = _cfg(args)
    res = cross_validate(cfg, args.slides, args.out, k=args.folds, group_by=args.group_by, folds=args.splits,
                         slide_ids=_ids(args.ids), baselines=args.baselines, mc_samples=args.mc_samples,
                         write_predictions=not args.no_predictions, progress=cfg.progress)
    show(res.table, res.out_dir)


@command(
    "predict",
    arg("--model", required=True, type=Path, help="checkpoint (model.pt) or its run directory"),
    [arg("--slides", type=Path, help="folder of prepared slides"),
     arg("--image", type=Path, help="an H&E image (JPEG/PNG/TIFF/SVS/...) with no expression data")],
    arg("--values", default="normalised", choices=("normalised", "log1p", "counts"),
        help="what maps show: normalised = log1p of counts per 10k over the model's genes"),
    arg("--out", required=True, type=Path, help="output folder"),
    arg("--ids", help="only these slide ids (comma list or file; with --slides)"),
    arg("--um-per-px", type=float, help="microns per full-resolution pixel of --image (default: its file's)"),
    arg("--genes", type=names, default="", help="genes to map, e.g. A,B (--image default: 4 most variable)"),
    arg("--reference", type=Path, help="prepared .h5ad of this section: coverage, correlation (summary)"),
    arg("--weights", type=Path, help="patch-encoder weights file (e.g. for uni)"),
    arg("--resolution", choices=("fine", "labels"), help="with --image: fine (default) = one prediction per "
        "pseudo-spot at the model's token pitch; labels = summed over the k x k blocks it was supervised on"),
    arg("--mc-samples", type=int, default=0, help="MC-dropout passes; adds layers['mc_std']"),
    arg("--seed", type=int, default=0, help="seed of the MC-dropout passes"),
    arg("--device", default="auto", help="auto, cpu, cuda, cuda:1 ..."),
    arg("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)"),
    NO_PROGRESS,
    help="predict prepared slides, or an H&E image alone, with a trained model",
    description="With --slides: write OUT/<id>.h5ad (X: predicted counts; layers['log1p'], and "
    "layers['measured_counts'] where the slide has counts). With --image: detect "
    "tissue, lay pseudo-spots at the model's training pitch and lattice, embed patches with the model's "
    "encoder, predict; write OUT/<slide>.h5ad, gene heatmap PNGs and OUT/summary.json.")
def cmd_predict(args: argparse.Namespace) -> None:
    image_only = [f"--{k.replace('_', '-')}" for k in ("um_per_px", "reference", "weights", "resolution")
                  if getattr(args, k) is not None]
    if args.image is None and image_only:
        raise InputError(" ".join(image_only), "only apply with --image")
    if args.image is not None and args.ids is not None:
        raise InputError("--ids", "only applies with --slides")
    set_threads(args.threads)
    bundle = load_bundle(args.model, device=resolve_device(args.device))
    if args.image is not None:
        s = predict_image(bundle, args.image, args.out, um_per_px=args.um_per_px, mc_samples=args.mc_samples,
                          genes_to_plot=args.genes or None, encoder_weights=args.weights, seed=args.seed,
                          reference=args.reference, device=str(bundle.device), progress=not args.no_progress,
                          log=LOG, values=args.values, map_resolution=args.resolution or "fine")
        brief = {k: s[k] for k in ("slide_id", "n_pseudo_spots", "um_per_px", "h5ad", "genes_plotted",
                                   "warnings")}
        if s.get("reference"):
            ref, corr = s["reference"], s["reference"].get("correlation") or {}
            brief["reference"] = {**{k: ref[k] for k in ("coverage", "precision", "match_distance_um")},
                                  **{k: corr.get(k) for k in ("mean_gene_pearson", "pooled_pearson", "map_pearson")}}
        print(json.dumps({**brief, "total_s": s["timings_s"]["total_s"]}))
        return
    known = set(map(str, bundle.genes))
    missing = [g for g in args.genes if g not in known]
    if missing:
        raise InputError("--genes", f"not among the model's {len(bundle.genes)} genes: {missing[:5]}")
    paths = predict_folder(bundle, args.slides, args.out, slide_ids=_ids(args.ids), seed=args.seed,
                           mc_samples=args.mc_samples, progress=not args.no_progress, log=LOG)
    maps = [str(plot_genes(p, args.genes, Path(p).with_name(f"{Path(p).stem}_maps.png"), values=args.values))
            for p in paths if args.genes]
    print(json.dumps({"predicted": len(paths), "genes": len(bundle.genes), "out": str(args.out),
                      "maps": maps}))


if __name__ == "__main__":  # torchrun -m hist_st.cli.train ...  ==  hist-st train ...
    sys.exit(main(["train", *sys.argv[1:]]))
