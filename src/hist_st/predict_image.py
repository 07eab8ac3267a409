"""Prediction on an H&E image alone (``hist-st predict --image``).

```python
from hist_st.train import load_bundle
from hist_st.predict_image import predict_image
bundle = load_bundle("runs/her2st/model.pt")
summary = predict_image(bundle, "C5.jpg", "out/", um_per_px=1.0, mc_samples=10)
```

Steps: tissue detection on a thumbnail (`hist_st.tissue.detect_tissue`); a pseudo-spot grid over the tissue
at the model's training spot pitch and lattice type (`hist_st.tissue.pseudo_spot_grid`); patches and
embeddings with the model's encoder and patch geometry (`hist_st.embed.embed_he_slide`); HiST
(`hist_st.train.predict.predict_slide`, optional Monte Carlo dropout). Outputs in ``out_dir``:

- ``<slide>.h5ad``: a prediction file (`hist_st.slide` contract): ``X`` = predicted counts
  ``relu(expm1(.))``, ``layers['log1p']``, ``layers['mc_std']`` with MC dropout, obs with the pseudo-spot
  geometry (``array_row``, ``array_col``, ``pxl_col_in_fullres``, ``pxl_row_in_fullres``, ``in_tissue``),
  ``obsm['spatial']`` (image pixels), the embeddings, the neighbour graph and the thumbnail in
  ``uns['spatial']``, so ``scanpy.pl.spatial(adata, color=gene)`` plots it;
- ``<slide>_<gene>.png``: the gene's library-size-normalised predicted expression (log1p counts per 10k
  over the model's genes) over the H&E, with the MC standard deviation beside it when drawn;
- ``summary.json``: parameters, where each came from, spot counts, timings and, with ``reference``, the
  agreement with the measured spots of the same section.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.embed import embed_he_slide
from hist_st.encoders import ENCODERS
from hist_st.errors import InputError
from hist_st.io.spaceranger import read_scalefactors, um_per_px_from_scalefactors
from hist_st.jsonio import to_jsonable, write_json
from hist_st.metrics import map_metrics, pearson, pearson_columns
from hist_st.pl import VALUES, normalise_counts, plot_genes
from hist_st.slide import Slide, is_prediction, read_prepared, write_prepared
from hist_st.tissue import detect_tissue, grid_phase, pseudo_spot_grid
from hist_st.train.checkpoint import lattice_type_for
from hist_st.train.coarse import coarsen_prediction, coarsen_slide, supervision_record
from hist_st.train.data import log1p_counts
from hist_st.train.predict import predict_log1p, predict_slide
from hist_st.wsi import open_image, upsampling_warning

__all__ = [
    "predict_image",
    "compare_to_reference",
    "model_grid",
    "image_resolution",
    "MATCH_PITCH_FRACTION",
]

#: A pseudo-spot and a measured spot match when their centres are closer than this fraction of the pitch.
MATCH_PITCH_FRACTION = 0.75

#: Patch geometry `hist-st prepare` uses by default; assumed for checkpoints that do not record theirs.
_DEFAULT_PATCH = {"size_px": 224, "um_per_px": 0.5}


def model_grid(bundle: Any) -> dict[str, Any]:
    """The spot grid and embedding recipe a model was trained with.

    Args:
        bundle: A `hist_st.train.checkpoint.ModelBundle`.

    Returns:
        ``{"technology", "pitch_um", "lattice", "lattice_unit_um", "encoder", "encoder_weights", "patch",
        "stain_norm", "sources"}``; ``sources`` says for each entry whether the checkpoint recorded it or
        how it was derived.

    Raises:
        InputError: the checkpoint records no spot pitch, or several technologies with different grids.
    """

    src = "model checkpoint"
    pitches = dict(bundle.spot_pitch_um)
    if not pitches:
        raise InputError(
            src, "records no training spot pitch (lattice.spot_pitch_um); retrain with this hist-st"
        )
    techs = sorted(pitches)
    if len(techs) > 1:
        grids = {(pitches[t], bundle.lattice_type.get(t) or lattice_type_for(t)) for t in techs}
        if len(grids) > 1:
            raise InputError(
                src, f"was trained on technologies with different spot grids {techs}; cannot pick one"
            )
    tech = techs[0]
    sources: dict[str, str] = {"pitch_um": "checkpoint", "technology": "checkpoint"}
    lattice = bundle.lattice_type.get(tech)
    sources["lattice"] = "checkpoint"
    if lattice is None:
        lattice = lattice_type_for(tech)
        sources["lattice"] = f"derived from technology {tech!r}"
    if lattice is None:
        raise InputError(src, f"records no lattice type for technology {tech!r} (hex or square)")
    unit = bundle.lattice_unit_um.get(tech, bundle.unit_for(tech))
    sources["lattice_unit_um"] = "checkpoint" if unit is not None else "default of the grid"
    inputs = dict(bundle.inputs or {})
    encoder = inputs.get("encoder")
    sources["encoder"] = "checkpoint"
    if not encoder:
        encoder = bundle.embedding
        sources["encoder"] = "the model's embedding key"

    if encoder not in ENCODERS and encoder.startswith("timm-"):
        encoder = "timm:" + encoder[len("timm-") :]  # the embedding key of timm:<name> is timm-<name>
    patch = inputs.get("patch")
    sources["patch"] = "checkpoint"
    if not patch:
        patch = dict(_DEFAULT_PATCH)
        sources["patch"] = "hist-st prepare default (the checkpoint does not record its patch geometry)"
    stain = inputs.get("stain_norm")
    return {
        "technology": tech,
        "pitch_um": float(pitches[tech]),
        "lattice": lattice,
        "lattice_unit_um": float(unit) if unit is not None else None,
        "encoder": encoder,
        "encoder_weights": inputs.get("encoder_weights"),
        "patch": {"size_px": int(patch["size_px"]), "um_per_px": float(patch["um_per_px"])},
        "stain_norm": stain if stain and stain != "none" else None,
        "sources": sources,
    }


def _spaceranger_um_per_px(image_path: Path) -> tuple[float, str] | None:
    """um/px of a Space Ranger ``tissue_hires/lowres_image`` from the ``scalefactors_json.json`` beside it."""

    name = image_path.name.lower()
    key = next((k for k in ("hires", "lowres") if name.startswith(f"tissue_{k}_image")), None)
    if key is None:
        return None
    sf = read_scalefactors(image_path.parent)
    upp = um_per_px_from_scalefactors(sf, key)
    if upp is None:
        return None
    return upp, (
        f"Space Ranger scale factors beside the image: 65 um / spot_diameter_fullres "
        f"{sf['spot_diameter_fullres']:g} px / tissue_{key}_scalef {sf[f'tissue_{key}_scalef']:g}"
    )


def _resolve_um_per_px(
    image_path: Path, um_per_px: float | None, reference: Slide | None
) -> tuple[float, str]:

    if um_per_px is not None:
        if not np.isfinite(um_per_px) or um_per_px <= 0:
            raise InputError("--um-per-px", f"must be a positive number, got {um_per_px}")
        return float(um_per_px), "given by the user"
    with open_image(image_path) as img:
        upp = img.um_per_px
    if upp is not None and np.isfinite(upp) and upp > 0:
        return float(upp), "recorded in the image file"
    visium = _spaceranger_um_per_px(image_path)
    if visium is not None:
        return visium
    if reference is not None and reference.um_per_px:
        return float(reference.um_per_px), f"from the reference slide {reference.slide_id!r} (same section)"
    raise InputError(
        image_path,
        "the image records no resolution (no TIFF resolution tags, OME/Aperio metadata or openslide mpp, no "
        "Space Ranger scalefactors_json.json beside it); pass --um-per-px (microns per pixel of this image)",
    )


def image_resolution(um_per_px: float, patch_um_per_px: float) -> dict[str, Any]:
    """How much patches are enlarged from the image's pixels, and a warning when it is more than 2x."""

    return {
        "source_um_per_px": float(um_per_px),
        "patch_upsampling": float(um_per_px) / float(patch_um_per_px),
        "warning": upsampling_warning(um_per_px, patch_um_per_px),
    }


def _corr_record(pred_log1p: np.ndarray, meas_log1p: np.ndarray) -> dict[str, Any]:
    r = pearson_columns(pred_log1p.astype(np.float64), meas_log1p.astype(np.float64))
    ok = np.isfinite(r)
    return {
        "n_pairs": int(pred_log1p.shape[0]),
        "mean_gene_pearson": float(np.mean(r[ok])) if ok.any() else float("nan"),
        "median_gene_pearson": float(np.median(r[ok])) if ok.any() else float("nan"),
        "n_genes_correlated": int(ok.sum()),
        "n_genes_constant": int((~ok).sum()),
        "pooled_pearson": pearson(pred_log1p.astype(np.float64), meas_log1p.astype(np.float64)),
        "map_pearson": map_metrics(pred_log1p, np.expm1(meas_log1p.astype(np.float64)))["pcc"],
        "_per_gene": r,
    }


def compare_to_reference(
    pred: Slide, reference: Slide, *, pitch_um: float, bundle: Any | None = None
) -> dict[str, Any]:
    """Agreement of pseudo-spot predictions with the measured spots of the same section.

    Both slides must be in the same image pixel frame (the reference prepared from the same H&E image).

    Args:
        pred: The prediction `Slide` (``predicted`` ``[M, G]``, ``spatial`` ``[M, 2]`` px).
        reference: The measured `Slide` (raw counts, ``spatial`` ``[N, 2]`` px in the same image).
        pitch_um: Spot pitch; spots match within ``MATCH_PITCH_FRACTION * pitch_um``.
        bundle: The model; when given and the reference holds its embedding, the model's predictions at
            the measured spots are scored too (what the image-only path loses to the grid).

    Returns:
        A JSON-able dict: ``match_distance_um``/``_px``, ``coverage`` (fraction of measured spots with a
        pseudo-spot within the distance), ``precision`` (fraction of pseudo-spots with a measured spot within
        it), ``correlation`` (pseudo-spots paired with their nearest measured spot within the distance:
        mean per-gene and pooled Pearson of log1p prediction vs log1p measured counts, and ``map_pearson``:
        `hist_st.metrics.map_metrics`, the maps' agreement, normalised over the genes both hold), ``per_gene`` and,
        with ``bundle``, ``at_measured_spots``.
    """
    from scipy.spatial import cKDTree

    if reference.counts is None:
        raise InputError(f"reference {reference.slide_id!r}", "holds no measured counts")
    if pred.predicted is None:
        raise InputError(f"slide {pred.slide_id!r}", "holds no predictions")
    upp = float(pred.um_per_px)
    ref_upp = reference.um_per_px
    if ref_upp and abs(ref_upp - upp) / upp > 0.05:
        raise InputError(
            f"reference {reference.slide_id!r}",
            f"has {ref_upp:.4g} um/px but the image is read at {upp:.4g} um/px; they are not the same image frame",
        )
    dist_um = MATCH_PITCH_FRACTION * float(pitch_um)
    tol_px = dist_um / upp
    ref_xy = np.asarray(reference.spatial, dtype=np.float64)
    ps_xy = np.asarray(pred.spatial, dtype=np.float64)
    d_ref, _ = cKDTree(ps_xy).query(ref_xy)
    d_ps, nearest = cKDTree(ref_xy).query(ps_xy)
    matched = d_ps < tol_px
    ref_genes = {str(g) for g in reference.genes}
    genes = [str(g) for g in pred.genes if str(g) in ref_genes]
    out: dict[str, Any] = {
        "reference": reference.slide_id,
        "match_distance_um": dist_um,
        "match_distance_px": float(tol_px),
        "match_rule": f"centres closer than {MATCH_PITCH_FRACTION:g} x pitch ({dist_um:g} um)",
        "n_measured_spots": int(len(ref_xy)),
        "n_pseudo_spots": int(len(ps_xy)),
        "coverage": float((d_ref < tol_px).mean()),
        "precision": float(matched.mean()),
        "median_offset_um": float(np.median(d_ps[matched]) * upp) if matched.any() else float("nan"),
        "n_genes_compared": len(genes),
    }
    if not genes or not matched.any():
        out["correlation"] = None
        return out
    col = {str(g): i for i, g in enumerate(pred.genes)}
    pred_log = np.log1p(np.asarray(pred.predicted, dtype=np.float64)[:, [col[g] for g in genes]])
    meas_log = log1p_counts(reference, genes)
    corr = _corr_record(pred_log[matched], meas_log[nearest[matched]])
    per_gene = corr.pop("_per_gene")
    corr["pairs"] = "each pseudo-spot within the match distance, paired with its nearest measured spot"
    out["correlation"] = corr
    order = np.argsort(-np.nan_to_num(per_gene, nan=-2.0))
    out["per_gene"] = {genes[i]: (float(per_gene[i]) if np.isfinite(per_gene[i]) else None) for i in order}
    if bundle is not None and bundle.embedding in reference.embeddings:
        y, _ = predict_log1p(bundle, reference)
        pos = {str(g): i for i, g in enumerate(bundle.genes)}
        at = _corr_record(y[:, [pos[g] for g in genes]], meas_log)
        at.pop("_per_gene")
        at["pairs"] = "the model run on the measured spots themselves (their own patches and layout)"
        out["at_measured_spots"] = at
    return out


def predict_image(
    bundle: Any,
    image_path: str | Path,
    out_dir: str | Path,
    *,
    um_per_px: float | None = None,
    genes_to_plot: Sequence[str] | None = None,
    mc_samples: int = 0,
    encoder_weights: str | Path | None = None,
    device: str = "cpu",
    reference: str | Path | Slide | None = None,
    slide_id: str | None = None,
    n_plot: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    thumbnail_size: int = 1024,
    values: str = "normalised",
    progress: bool = False,
    log: Any = None,
    map_resolution: str = "fine",
) -> dict[str, Any]:
    """Predict expression on an H&E image that was never sequenced.

    Args:
        bundle: A trained `hist_st.train.checkpoint.ModelBundle` (`load_bundle`).
        image_path: The H&E image (any format `hist_st.wsi.open_image` reads).
        out_dir: Output folder (created).
        um_per_px: Microns per full-resolution pixel; default: recorded in the image file, else the
            reference slide's (same section), else `InputError`.
        genes_to_plot: Genes to draw; default: the ``n_plot`` genes with the highest variance of log1p
            prediction across pseudo-spots.
        mc_samples: Monte Carlo dropout passes (0: one deterministic pass); K > 0 adds ``predicted_std``.
        encoder_weights: Weights file of the patch encoder (when the encoder needs one, e.g. ``uni``).
        device: Device for the encoder (the model stays on the bundle's device).
        reference: The prepared ``.h5ad`` (or `Slide`) of the same section with measured expression; the
            pseudo-spot grid takes its phase (pseudo-spots on the measured spots), and the summary gets
            coverage and correlation.
        slide_id: Output name; default: the image file stem.
        n_plot: Number of genes drawn by default.
        seed: Seed of the MC dropout passes.
        batch_size: Patches per encoder batch.
        thumbnail_size: Longer side of the thumbnail used for tissue detection and the plots.
        values: What the maps show (`hist_st.pl.VALUES`; default library-size-normalised log expression).
        progress: Show progress bars.
        log: Callable receiving warnings (default: none; they are always in the summary).
        map_resolution: ``"fine"``: one prediction per pseudo-spot at the model's token pitch (its training
            slides' spot pitch; for a model trained with ``supervise=coarse<k>`` that is ``k`` times finer
            than the labels it learnt from). ``"labels"``: those predictions summed over ``k x k`` blocks of
            pseudo-spots, the resolution the model was supervised at (the same as ``"fine"`` for a
            spot-supervised model). The summary's ``map_resolution`` records both pitches.

    Returns:
        The summary dict also written to ``out_dir/summary.json``: ``slide_id``, ``image``, ``h5ad``,
        ``heatmaps``, ``grid`` (technology, pitch, lattice, unit, encoder, patch, and their sources),
        ``um_per_px`` and its source, ``n_pseudo_spots``, ``tissue_fraction``, ``n_patch_outside``,
        ``genes_plotted``, ``mc_samples``, ``timings_s`` and, with ``reference``, ``reference``
        (see `compare_to_reference`).

    Raises:
        InputError: unreadable image, no resolution, no tissue, or a model without a recorded grid.
    """

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    image_path = Path(image_path)
    if not image_path.is_file():
        raise InputError(image_path, "image not found")
    if mc_samples < 0:
        raise InputError("--mc-samples", f"must be >= 0, got {mc_samples}")
    if values not in VALUES:
        raise InputError("--values", f"unknown values {values!r}; use {', '.join(VALUES)}")
    if map_resolution not in ("fine", "labels"):
        raise InputError("--resolution", f"unknown resolution {map_resolution!r}; use fine (the model's token pitch) or "
                         "labels (summed over the blocks the model was supervised on)")
    model_genes = {str(g) for g in bundle.genes}
    if genes_to_plot:
        missing = [str(g) for g in genes_to_plot if str(g) not in model_genes]
        if missing:
            raise InputError("--genes", f"not among the model's {len(model_genes)} genes: {missing[:5]}")
    dest = Path(out_dir) / f"{slide_id or image_path.stem.split('.')[0]}.h5ad"
    if dest.exists() and not is_prediction(dest):
        raise InputError(
            dest, f"already holds a prepared slide (not a prediction file); the prediction of {image_path} would "
            "replace it: choose another --out folder",
        )
    ref = None
    if reference is not None:
        ref = reference if isinstance(reference, Slide) else read_prepared(reference)
    grid = model_grid(bundle)
    upp, upp_source = _resolve_um_per_px(image_path, um_per_px, ref)
    origin, angle = grid_phase(ref.spatial, grid["pitch_um"] / upp, grid["lattice"]) if ref is not None else (None, 0.0)

    t0 = time.perf_counter()
    with open_image(image_path, um_per_px=upp) as img:
        resolution = image_resolution(img.source_um_per_px, grid["patch"]["um_per_px"])
        warnings = [resolution["warning"]] if resolution["warning"] else []
        for w in warnings:
            if log is not None:
                log(f"WARNING: {w}")
        mask = detect_tissue(img, max_size=thumbnail_size)
        timings["tissue_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        slide = pseudo_spot_grid(
            img,
            pitch_um=grid["pitch_um"],
            lattice=grid["lattice"],
            lattice_unit_um=grid["lattice_unit_um"],
            um_per_px=upp,
            mask=mask,
            slide_id=slide_id,
            thumbnail_size=thumbnail_size,
            origin=origin,
            angle_deg=angle,
        )
        image_size = [int(img.width), int(img.height)]
    slide.meta["um_per_px_source"] = upp_source
    timings["grid_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    embed_he_slide(
        slide,
        encoder=grid["encoder"],
        weights=encoder_weights,
        device=device,
        patch_px=grid["patch"]["size_px"],
        patch_um_per_px=grid["patch"]["um_per_px"],
        batch_size=batch_size,
        stain_norm=grid["stain_norm"],
        progress=progress,
    )
    timings["embed_s"] = time.perf_counter() - t0
    if bundle.embedding not in slide.embeddings:
        raise InputError(
            f"encoder {grid['encoder']!r}",
            f"produced embedding {sorted(slide.embeddings)} but the model reads {bundle.embedding!r}",
        )

    t0 = time.perf_counter()
    pred = predict_slide(bundle, slide, mc_samples=mc_samples, seed=seed)
    timings["predict_s"] = time.perf_counter() - t0
    pred.meta["prediction"].update(source_image=str(image_path), grid=grid)

    supervision = supervision_record(bundle.config, grid["pitch_um"])
    block = supervision["block"] if map_resolution == "labels" else 1
    n_pseudo = int(pred.n_spots)
    n_outside = int(np.asarray(pred.patch_outside).sum()) if pred.patch_outside is not None else 0
    if block > 1:
        pred = coarsen_prediction(pred, block)
        if ref is not None:
            ref = coarsen_slide(ref, block)[0]
    pred.meta["prediction"]["supervision"] = supervision
    resolution_record = {"resolution": map_resolution, "pseudo_spot_pitch_um": grid["pitch_um"],
                         "map_pitch_um": grid["pitch_um"] * block, "label_pitch_um": supervision["label_pitch_um"],
                         "note": supervision["note"]}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    h5ad = write_prepared(pred, out / f"{pred.slide_id}.h5ad")
    if genes_to_plot:
        genes = [str(g) for g in genes_to_plot]
    else:  # the most variable genes of the normalised map (not of library size)

        var = normalise_counts(pred.predicted).var(0)
        genes = [str(pred.genes[i]) for i in np.argsort(-var)[: max(0, n_plot)]]
    pngs = []
    for g in genes:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in g)
        pngs.append(plot_genes(pred, [g], out / f"{pred.slide_id}_{safe}.png", values=values))
    timings["write_s"] = time.perf_counter() - t0

    summary: dict[str, Any] = {
        "slide_id": pred.slide_id,
        "image": str(image_path.resolve()),
        "image_size_px": image_size,
        "h5ad": str(h5ad),
        "heatmaps": [str(p) for p in pngs],
        "heatmap_values": VALUES[values],
        "genes_plotted": list(genes),
        "warnings": warnings,
        **{k: resolution[k] for k in ("source_um_per_px", "patch_upsampling")},
        "grid": grid,
        "um_per_px": upp,
        "um_per_px_source": upp_source,
        "n_pseudo_spots": n_pseudo,
        "tissue_fraction": float(mask.fraction),
        "fiducial_dots_removed": int(mask.n_fiducials),
        "grid_origin_px": list(origin) if origin is not None else None,
        "grid_angle_deg": angle,
        "n_patch_outside": n_outside,
        "n_genes": len(pred.genes),
        "embedding": bundle.embedding,
        "mc_samples": int(mc_samples),
        "map_resolution": resolution_record,
    }
    if ref is not None:
        t0 = time.perf_counter()
        summary["reference"] = compare_to_reference(pred, ref, pitch_um=grid["pitch_um"] * block, bundle=bundle)
        timings["reference_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    timings["patches_per_s"] = n_pseudo / timings["embed_s"] if timings["embed_s"] > 0 else float("nan")
    summary["timings_s"] = timings
    summary = to_jsonable(summary)
    write_json(summary, out / "summary.json")
    return summary
