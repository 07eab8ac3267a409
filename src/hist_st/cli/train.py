"""``hist-st train``, ``hist-st cv`` and ``hist-st predict``: thin wrappers over `hist_st.train`.

Configuration: ``--config run.yaml``, the gene set ``--genes he:250`` (as on every command) and trailing
``key=value`` overrides (``epochs=20 model.dim=256 augment.variant=authors``). Multi-process data parallel: launch with torchrun, e.g.
``torchrun --nproc_per_node 2 -m hist_st.cli.train --slides cohort/ --out runs/a`` (this module run as a
script is ``hist-st train``), or ``torchrun --nproc_per_node 2 "$(which hist-st)" train ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hist_st.errors import InputError


def _ids(value: str | None) -> list[str] | None:
    if value is None:
        return None
    p = Path(value)
    if p.is_file():
        items = [line.strip() for line in p.read_text().splitlines()]
    else:
        items = [v.strip() for v in value.split(",")]
    items = [v for v in items if v]
    if not items:
        raise InputError(value, "empty slide id list")
    dup = sorted({v for v in items if items.count(v) > 1})
    if dup:
        raise InputError("--ids", f"slide id(s) listed more than once: {', '.join(dup)}")
    return items


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML file with TrainConfig keys")
    p.add_argument("--genes", default=None,
                   help="gene set: hvg:N (top N HVGs) or he:N (N most expressed); default: the config's (hvg:2000)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. epochs=20 model.dim=256")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--supervise-at", default=None, metavar="spot|coarse<k>",
                   help="where the labels are: spot (default) or coarse<k>, e.g. coarse2: each 2x2 block of "
                   "neighbouring spots is one label (counts summed) and the model learns to predict every spot "
                   "from it (super-resolution; the config key supervise)")


def _cfg(args: argparse.Namespace, base: dict | None = None):
    from hist_st.train.config import run_config, with_gene_set

    overrides = with_gene_set(args.overrides, args.genes)
    if getattr(args, "supervise_at", None):
        overrides.append(f"supervise={args.supervise_at}")
    if args.no_progress:
        overrides.append("progress=false")
    return run_config(args.config, overrides, base=base)


def cmd_train(args: argparse.Namespace) -> int:
    from hist_st.train.checkpoint import finished_epochs, load_resume_state, resume_source
    from hist_st.train.loop import train

    resume = args.resume_from
    if resume is None and args.resume:
        done = finished_epochs(args.out)
        if done is not None:
            print(f"the run in {args.out} already finished all {done} epochs; nothing to resume")
            return 0
        resume = resume_source(args.out)
    base = dict(load_resume_state(resume)["config"]) if resume is not None else None
    cfg = _cfg(args, base)
    result = train(cfg, args.slides, slide_ids=_ids(args.ids), out_dir=args.out, resume=resume,
                   accept_changes=args.accept_changes, overwrite=args.overwrite)
    if result.checkpoint is not None:  # master process only
        last = result.history[-1] if result.history else {}
        print(f"trained on {len(result.slide_ids)} slides, {len(result.bundle.genes)} genes; "
              f"final loss {last.get('loss', float('nan')):.4f}; checkpoint: {result.checkpoint}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from hist_st.evaluate import cross_validate

    cfg = _cfg(args)
    baselines = [b for b in (args.baselines or "").split(",") if b]
    res = cross_validate(cfg, args.slides, args.out, k=args.folds, group_by=args.group_by, folds=args.splits,
                         slide_ids=_ids(args.ids), baselines=baselines, write_predictions=not args.no_predictions,
                         mc_samples=args.mc_samples, progress=cfg.progress)
    print(res.table)
    print(f"results in {res.out_dir}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from hist_st.runtime import resolve_device, set_threads
    from hist_st.train.checkpoint import load_bundle
    from hist_st.train.predict import predict_folder

    set_threads(args.threads)
    image_only = ("um_per_px", "reference", "weights", "resolution")
    if args.image is None:
        given = [f"--{k.replace('_', '-')}" for k in image_only if getattr(args, k) is not None]
        if given:
            raise InputError(" ".join(given), "only apply with --image")
    bundle = load_bundle(args.model, device=resolve_device(args.device))
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else []
    if args.image is not None:
        from hist_st.predict_image import predict_image

        if args.ids is not None:
            raise InputError("--ids", "only applies with --slides")
        summary = predict_image(
            bundle, args.image, args.out, um_per_px=args.um_per_px, genes_to_plot=genes or None,
            mc_samples=args.mc_samples, encoder_weights=args.weights, device=str(bundle.device),
            reference=args.reference, seed=args.seed, progress=not args.no_progress, values=args.values,
            log=lambda m: print(m, file=sys.stderr), map_resolution=args.resolution or "fine",
        )
        brief = {k: summary[k] for k in ("slide_id", "n_pseudo_spots", "um_per_px", "h5ad", "genes_plotted",
                                         "warnings")}
        ref = summary.get("reference")
        if ref:
            corr = ref.get("correlation") or {}
            brief["reference"] = {
                "coverage": ref["coverage"], "precision": ref["precision"],
                "match_distance_um": ref["match_distance_um"],
                "mean_gene_pearson": corr.get("mean_gene_pearson"), "pooled_pearson": corr.get("pooled_pearson"),
            }
        brief["total_s"] = summary["timings_s"]["total_s"]
        print(json.dumps(brief))
        return 0
    missing = [g for g in genes if g not in set(map(str, bundle.genes))]
    if missing:
        raise InputError("--genes", f"not among the model's {len(bundle.genes)} genes: {missing[:5]}")
    paths = predict_folder(bundle, args.slides, args.out, slide_ids=_ids(args.ids), mc_samples=args.mc_samples,
                           seed=args.seed, progress=not args.no_progress,
                           log=lambda m: print(m, file=sys.stderr))
    maps = []
    if genes:
        from hist_st.pl import plot_genes

        maps = [str(plot_genes(p, genes, Path(p).with_name(f"{Path(p).stem}_maps.png"), values=args.values))
                for p in paths]
    print(json.dumps({"predicted": len(paths), "genes": len(bundle.genes), "out": str(args.out), "maps": maps}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train HiST on a folder of prepared slides",
                              description="Train HiST on prepared slides; writes OUT/model.pt (restorable).")
    p.add_argument("--slides", required=True, type=Path, help="folder of prepared slides (<id>.h5ad)")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--ids", default=None, help="comma-separated slide ids, or a file with one per line")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (from OUT/resume.pt)")
    p.add_argument("--resume-from", type=Path, default=None,
                   help="continue from this resume state (resume.pt, a run folder or an older full checkpoint)")
    p.add_argument("--accept-changes", action="store_true",
                   help="with --resume: continue although the slides or their content, augmentation, seed, amp or gradient "
                        "checkpointing differ from the checkpoint (recorded in OUT/accepted_changes.json)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint of an earlier run in OUT")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("cv", help="k-fold cross-validation (HiST and baselines, both protocols)",
                              description="Cross-validate on prepared slides; folds by slide or by a group column.")
    p.add_argument("--slides", required=True, type=Path, help="folder of prepared slides")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--folds", type=int, default=4, help="number of folds (default 4)")
    p.add_argument("--group-by", default=None, help="group column, e.g. patient (default: folds by slide)")
    p.add_argument("--splits", type=Path, default=None, help="use the folds of this splits.json")
    p.add_argument("--ids", default=None, help="restrict to these slide ids (comma list or file)")
    p.add_argument("--baselines", default="", help="comma-separated baselines on the same folds, e.g. ridge,mean")
    p.add_argument("--mc-samples", type=int, default=0, help="MC-dropout passes for predicted_std (default 0)")
    p.add_argument("--no-predictions", action="store_true", help="do not write prediction files")
    _common(p)
    p.set_defaults(func=cmd_cv)

    p = subparsers.add_parser("predict", help="predict prepared slides, or an H&E image alone, with a trained model",
                              description="With --slides: write OUT/<id>.h5ad with layers['predicted'] (counts). "
                              "With --image: detect tissue, lay pseudo-spots at the model's training pitch and "
                              "lattice, embed patches with the model's encoder, predict; write OUT/<slide>.h5ad, "
                              "gene heatmap PNGs and OUT/summary.json.")
    p.add_argument("--model", required=True, type=Path, help="checkpoint (model.pt) or its run directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--slides", type=Path, help="folder of prepared slides")
    src.add_argument("--image", type=Path, help="an H&E image (JPEG/PNG/TIFF/SVS/...) with no expression data")
    p.add_argument("--values", default="normalised", choices=("normalised", "log1p", "counts"),
                   help="what maps show: normalised = log1p of counts per 10k over the model's genes")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--ids", default=None, help="only these slide ids (comma list or file; with --slides)")
    p.add_argument("--um-per-px", type=float, default=None,
                   help="microns per full-resolution pixel of --image (default: from the file's metadata)")
    p.add_argument("--genes", default=None, help="comma-separated genes to map (--image default: the 4 most variable "
                   "normalised genes; --slides: maps only when given, measured beside predicted when known)")
    p.add_argument("--reference", type=Path, default=None,
                   help="prepared .h5ad of the same section with measured expression: adds coverage and "
                        "correlation to summary.json")
    p.add_argument("--weights", type=Path, default=None, help="patch-encoder weights file (e.g. for uni)")
    p.add_argument("--resolution", default=None, choices=("fine", "labels"),
                   help="with --image: fine (default) = one prediction per pseudo-spot at the model's token pitch "
                   "(its training spot pitch; for a model trained with --supervise-at coarse<k>, k times finer than "
                   "its labels); labels = those predictions summed over the k x k blocks it was supervised on")
    p.add_argument("--mc-samples", type=int, default=0, help="MC-dropout passes; adds layers['predicted_std']")
    p.add_argument("--seed", type=int, default=0, help="seed of the MC-dropout passes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_predict)


if __name__ == "__main__":  # torchrun -m hist_st.cli.train ...  ==  hist-st train ...
    import sys

    from hist_st.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
