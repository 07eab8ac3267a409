"""``hist-st prepare``: turn raw slides (her2st, HEST-1k, Space Ranger, AnnData) into a prepared cohort."""

from __future__ import annotations

import argparse

from hist_st.errors import InputError
from hist_st.runtime import set_threads

FORMATS = ("her2st", "hest", "spaceranger", "anndata")  # hist_st.sources.FORMATS, without importing it


#: `prepare_cohort` keywords taken from the options of the same name.
PREPARE_OPTIONS = ("encoder", "weights", "device", "patch_px", "patch_um_per_px", "batch_size", "encoder_precision",
                   "stain_norm", "stain_reference", "gene_mapping", "hvg_scope", "train_slides", "allow_missing_image",
                   "overwrite")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="read slides, cut patches, embed them and harmonise genes into a cohort folder",
        description="Prepare a cohort: one <slide>.h5ad per slide plus cohort.json. Resumable: finished slides are "
        "skipped; embeddings are cached per slide and encoder.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--format", required=True, choices=FORMATS, help="input layout")
    p.add_argument("--input", required=True, nargs="+",
                   help="her2st/hest: the data folder; spaceranger: outs/ folder(s); anndata: .h5ad file(s); "
                   "or one CSV/TSV sample table (columns path, image, slide_id, patient, um_per_px)")
    p.add_argument("--image", nargs="+", default=None,
                   help="H&E image(s), one per --input (spaceranger/anndata): full resolution, or a Space Ranger "
                   "tissue_hires/lowres image (scale from scalefactors_json.json or --image-scale). Default: the "
                   "folder's own hires (else lowres) image, or the images in the AnnData's uns['spatial']")
    p.add_argument("--image-scale", nargs="+", type=float, default=None,
                   help="image pixels per full-resolution pixel, one per --input (overrides the detected scale)")
    p.add_argument("--allow-missing-image", action="store_true",
                   help="skip slides without an H&E image (default: refuse them)")
    p.add_argument("--slide-id", nargs="+", default=None, help="slide id(s), one per --input (spaceranger/anndata)")
    p.add_argument("--patient", nargs="+", default=None, help="patient id(s), one per --input (spaceranger/anndata)")
    p.add_argument("--sections", nargs="+", default=None, help="her2st section ids / HEST sample ids to include")
    p.add_argument("--um-per-px", type=float, default=None,
                   help="microns per full-resolution pixel; overrides the value derived from the spot spacing or "
                   "recorded in the image (her2st, spaceranger, anndata; HEST records it per sample)")
    p.add_argument("--out", required=True, help="output cohort folder")
    p.add_argument("--encoder", default="efficientnet-lite0", help="efficientnet-lite0, uni, or timm:<name>")
    p.add_argument("--weights", default=None, help="encoder weights file (uni, timm:<name>)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--patch-px", type=int, default=224, help="patch side in pixels")
    p.add_argument("--patch-um-per-px", type=float, default=0.5, help="patch resolution (um per pixel)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--encoder-precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the encoder in bfloat16 on the CPU (AMX; faster, embeddings differ by bf16 "
                   "rounding, see docs/results/speed.md); fp32 (default) keeps embeddings as they were")
    p.add_argument("--stain-norm", choices=("none", "macenko"), default="none", help="stain normalisation (torchstain)")
    p.add_argument("--stain-reference", default=None,
                   help="reference H&E image for --stain-norm (default: torchstain's)")
    p.add_argument("--gene-mapping", default=None, help="CSV/TSV of Ensembl id -> gene symbol")
    p.add_argument("--hvg-scope", choices=("dataset", "train-only"), default="dataset")
    p.add_argument("--train-slides", nargs="+", default=None, help="training slide ids for --hvg-scope train-only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="re-prepare slides that are already done")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    import sys

    from hist_st.prepare import prepare_cohort
    from hist_st.sources import find_sources

    if args.threads is not None and args.threads < 1:
        raise InputError("--threads", f"must be >= 1, got {args.threads}")
    set_threads(args.threads)
    sources = find_sources(args.format, args.input, images=args.image, image_scales=args.image_scale,
                           slide_ids=args.slide_id, patients=args.patient, um_per_px=args.um_per_px,
                           sections=args.sections)
    report = prepare_cohort(sources, args.out, **{k: getattr(args, k) for k in PREPARE_OPTIONS},
                            progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the merged report
        print(report.summary())
    if report.failed and not (report.prepared or report.skipped_done):
        return 1
    return 0 if not report.failed else 3
