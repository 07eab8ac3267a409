"""``hist-st prepare``: turn raw slides (her2st, HEST-1k, Space Ranger, AnnData) into a prepared cohort."""

from __future__ import annotations

import argparse
import inspect
import os
import sys

from hist_st.cli import NO_PROGRESS, arg, command
from hist_st.errors import InputError
from hist_st.prepare import prepare_cohort
from hist_st.runtime import set_threads
from hist_st.sources import FORMATS, find_sources

EACH = "one per --input (spaceranger/anndata)"


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
    arg("--threads", type=int, help="torch CPU threads (default: all cores)"),
    arg("--overwrite", action="store_true", help="re-prepare slides that are already done"),
    NO_PROGRESS,
    help="read slides, cut patches, embed them and harmonise genes into a cohort folder",
    description="Prepare a cohort: one <slide>.h5ad per slide plus cohort.json. Resumable: finished slides "
    "are skipped; embeddings are cached per slide and encoder.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
def run(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads", f"must be >= 1, got {args.threads}")
    set_threads(args.threads)
    sources = find_sources(args.format, args.input, images=args.image, image_scales=args.image_scale,
                           slide_ids=args.slide_id, patients=args.patient, um_per_px=args.um_per_px,
                           sections=args.sections)
    same_name = {k: v for k, v in vars(args).items() if k in inspect.signature(prepare_cohort).parameters}
    report = prepare_cohort(sources, args.out, **same_name, progress=not args.no_progress,
                            log=lambda s: print(s, file=sys.stderr))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the merged report
        print(report.summary())
    if report.failed:
        return 3 if report.prepared or report.skipped_done else 1
    return 0
