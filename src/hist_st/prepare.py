"""`hist-st prepare`: the pipeline that turns a cohort's sources into prepared slides and ``cohort.json``.

For each slide: read it (`hist_st.sources` / `hist_st.io`), harmonise gene names (`hist_st.harmonise`), open
and check its image (`hist_st.wsi.open_slide_image`) or its HEST patches (`hist_st.io.hest.use_stored_patches`),
embed the spot-centred patches (`hist_st.embed`, cached per slide: `hist_st.prepared.embedding_cache_path`),
compute its lattice sites and write ``<out>/<slide_id>.h5ad`` atomically. Finished slides are skipped on a
re-run (`hist_st.prepared.pending_sources`); a failing slide is reported and leaves the others alone; slides
without an image are reported and skipped. Then `hist_st.cohort.finalise_cohort` restricts every slide to
the shared gene set, ranks genes and writes ``<out>/cohort.json``. Under torchrun the slides are shared
over the ranks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hist_st.cohort import finalise_cohort
from hist_st.embed import embed_slide_cached
from hist_st.encoders import Encoder, get_encoder
from hist_st.errors import InputError
from hist_st.harmonise import harmonise_slide, load_gene_mapping
from hist_st.io._util import attach_lattice, fill_pitch
from hist_st.io.hest import use_stored_patches
from hist_st.prepared import embedding_cache_path, pending_sources, prepared_key
from hist_st.runtime import resolve_device
from hist_st.slide import write_prepared
from hist_st.sources import SlideSource, file_signature
from hist_st.stain import macenko_normaliser
from hist_st.train.distributed import DistInfo, barrier, gather_objects, init_distributed
from hist_st.wsi import PatchParams, open_slide_image

__all__ = ["PrepareReport", "MissingImageError", "prepare_cohort", "prepare_slide"]


class MissingImageError(InputError):
    """The slide has no H&E image (skipped with ``allow_missing_image``, an error otherwise)."""


@dataclass
class PrepareReport:
    """What `prepare_cohort` did; ``timings`` holds seconds and patch counts for throughput."""

    out_dir: Path
    prepared: list[str] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)
    skipped_no_image: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    manifest: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        t = self.timings
        lines = [
            f"prepared {len(self.prepared)} slide(s), {len(self.skipped_done)} already done, "
            f"{len(self.skipped_no_image)} without an image skipped, {len(self.failed)} failed",
        ]
        if self.skipped_no_image:
            lines.append("no image (skipped): " + ", ".join(self.skipped_no_image))
        lines += [f"FAILED {sid}: {err}" for sid, err in self.failed.items()]
        lines += [f"WARNING {sid}: {m}" for sid, msgs in self.warnings.items() for m in msgs]
        n = t.get("patches", 0)
        if n:
            lines.append(
                f"patches: {int(n)}; extraction {n / max(t.get('extract_s', 0), 1e-9):.1f} patches/s, "
                f"encoding {n / max(t.get('encode_s', 0), 1e-9):.1f} patches/s "
                f"({t.get('threads', 0):.0f} torch threads)"
            )
        if t.get("cached_slides"):
            lines.append(f"embeddings reused from cache for {int(t['cached_slides'])} slide(s)")
        lines.append(f"total {t.get('total_s', 0):.1f} s; manifest: {self.manifest}")
        return "\n".join(lines)

    def merge_ranks(self, info: DistInfo) -> None:
        """Every rank's prepared/failed/warnings and summed timings, in place (a collective call)."""
        parts = gather_objects((self.prepared, self.failed, self.warnings, self.skipped_no_image, self.timings), info)
        self.prepared = [s for p in parts for s in p[0]]
        self.failed = {k: v for p in parts for k, v in p[1].items()}
        self.warnings = {k: v for p in parts for k, v in p[2].items()}
        self.skipped_no_image = sorted({s for p in parts for s in p[3]})
        for key in ("extract_s", "encode_s", "patches", "cached_slides", "thumbnail_s"):
            if any(key in p[4] for p in parts):
                self.timings[key] = sum(p[4].get(key, 0.0) for p in parts)


def prepare_slide(
    src: SlideSource, out_dir: Path, encoder: Encoder, params: PatchParams, *, batch_size: int = 32,
    stain_norm: str | None = None, transform: Callable | None = None, gene_mapping: dict | None = None,
    thumbnail_size: int = 1024, progress: bool = True, timings: dict | None = None,
    warnings: list[str] | None = None,
) -> Path:
    """Prepare one slide: read it, harmonise its genes, embed its patches, attach its lattice, and write
    ``<out_dir>/<slide_id>.h5ad`` atomically.

    Args:
        src: Where the slide comes from (`hist_st.sources.SlideSource`: its reader, image, stored patches).
        out_dir: The cohort folder; it also holds the embedding cache.
        encoder: Patch encoder (`hist_st.encoders.Encoder`).
        params: Patch geometry (`hist_st.wsi.PatchParams`: size in px at a fixed um/px).
        batch_size: Patches per encoder batch.
        stain_norm: ``"macenko"`` or None; recorded and part of the embedding cache key.
        transform: The stain transform applied to each patch before encoding (None: none).
        gene_mapping: Extra id -> symbol pairs for gene harmonisation (`hist_st.harmonise.load_gene_mapping`).
        thumbnail_size: Longest side in px of the thumbnail stored with the slide.
        progress: Progress bar over patch batches.
        timings: Receives seconds per stage (``extract_s``, ``encode_s``, ``thumbnail_s``) and counts when given.
        warnings: Receives the slide's warnings (e.g. patches enlarged from a low-resolution image) when given;
            they are also recorded in the slide's ``meta['warnings']``.

    Returns:
        The written ``.h5ad`` path.

    Raises:
        MissingImageError: The slide has neither an image nor stored patches.
        InputError: No um/px is known, or the image or spots are unusable (named with the file).
    """
    timings = timings if timings is not None else {}
    warnings = warnings if warnings is not None else []
    slide = src.load()
    slide.slide_id = src.slide_id
    if src.patient and not slide.patient:
        slide.patient = src.patient
    harmonise_slide(slide, symbols=slide.meta.pop("_gene_symbols", None), mapping=gene_mapping)
    if not slide.image and src.stored_patches is None:
        raise MissingImageError(
            f"slide {slide.slide_id!r}",
            "has no H&E image to cut patches from: give --image (full resolution, or a Space Ranger "
            "hires/lowres image), or --allow-missing-image to skip such slides",
        )
    image = None
    if slide.image:
        image = open_slide_image(slide, params, warnings, thumbnail_size=thumbnail_size, timings=timings)
    try:
        if slide.um_per_px is None:
            raise InputError(f"slide {slide.slide_id!r}", "no um per pixel known (no image resolution); pass --um-per-px")
        fill_pitch(slide)
        stored = src.stored_patches and use_stored_patches(slide, src.stored_patches, params, has_wsi=image is not None)
        if stored is not None:
            slide.meta["patches_from"] = str(stored)
        cache = embedding_cache_path(out_dir, slide, src, encoder, params, stain_norm)
        emb, outside = embed_slide_cached(cache, slide, image, encoder, params, batch_size=batch_size, transform=transform,
                                          stored_patches=stored, progress=progress, timings=timings)
    finally:
        if image is not None:
            image.close()
    slide.embeddings[encoder.name] = emb
    slide.patch_outside = outside
    attach_lattice(slide)
    if grid_warning := (slide.meta.get("grid_check") or {}).get("warning"):
        warnings.append(grid_warning)
    slide.meta.update(
        prepare_key=prepared_key(src, encoder.cache_key, params, stain_norm),
        patch=params.as_dict(),
        stain_norm=stain_norm,
        encoder=encoder.name,
        encoder_weights=encoder.weights_id,
        n_patch_outside=int(outside.sum()),
        warnings=list(warnings),
    )
    return write_prepared(slide, out_dir / f"{slide.slide_id}.h5ad")


def prepare_cohort(
    sources: Sequence[SlideSource], out_dir: str | Path, *, encoder: str = "efficientnet-lite0",
    weights: str | Path | None = None, device: str | None = None, patch_px: int = 224,
    patch_um_per_px: float = 0.5, batch_size: int = 32, encoder_precision: str = "fp32",
    stain_norm: str | None = None, stain_reference: str | Path | None = None, gene_mapping: str | Path | None = None,
    hvg_scope: str = "dataset", train_slides: Sequence[str] | None = None, thumbnail_size: int = 1024,
    overwrite: bool = False, allow_missing_image: bool = False, progress: bool = True,
    log: Callable[[str], None] | None = print, dist_info: DistInfo | None = None,
) -> PrepareReport:
    """Prepare a cohort of slides into ``out_dir`` (one ``.h5ad`` per slide plus ``cohort.json``).

    Args:
        sources: Slides to prepare (`sources_from_her2st`, `sources_from_hest`, ...).
        out_dir: Output folder.
        encoder: Encoder registry name (`hist_st.encoders.get_encoder`).
        weights: Encoder weights file.
        patch_px, patch_um_per_px: Patch geometry (default 224 px at 0.5 um/px).
        encoder_precision: ``fp32`` (default) or ``bf16`` (on the CPU a bfloat16 copy of the encoder: faster
            with AMX, embeddings within bf16 rounding of fp32; part of the cache and prepared keys).
        stain_norm: None or ``"macenko"``.
        gene_mapping: Optional Ensembl id -> symbol mapping file.
        hvg_scope: ``"dataset"`` (all slides, as in the paper) or ``"train-only"`` (needs ``train_slides``);
            the all-slide ranking is always stored too (``hvg_dataset``).
        overwrite: Re-prepare slides that are already done.
        allow_missing_image: Skip slides without an H&E image (and say so) instead of refusing them.
        dist_info: A `hist_st.train.distributed.DistInfo` when run under torchrun (default: joined from the
            environment): the slides to prepare are shared round-robin over the ranks, each slide written
            atomically by one rank (resumable as in one process); after a barrier, rank 0 builds the cohort
            manifest and every rank returns the merged report.

    Returns:
        A `PrepareReport`; its ``warnings`` (e.g. patches enlarged from a low-resolution image) are also
        printed through ``log`` and recorded in ``cohort.json``.

    Raises:
        InputError: bad options, or slides without an image and ``allow_missing_image`` not set.
    """
    info = dist_info if dist_info is not None else init_distributed(device or "auto")
    if info.enabled and (device in (None, "auto", "cuda")):
        device = str(resolve_device(device or "auto", info.local_rank))  # one GPU per rank
    t_start = time.perf_counter()
    out = Path(out_dir)
    say = log or (lambda s: None)
    for name, value in (("--patch-px", patch_px), ("--patch-um-per-px", patch_um_per_px), ("--batch-size", batch_size)):
        if not (np.isfinite(value) and value > 0):  # checked before anything is created
            raise InputError(name, f"must be a positive number, got {value}")
    if hvg_scope not in ("dataset", "train-only"):
        raise InputError("--hvg-scope", f"unknown scope {hvg_scope!r}; use dataset or train-only")
    if hvg_scope == "train-only" and not train_slides:
        raise InputError("--hvg-scope", "train-only needs the training slide ids (--train-slides)")
    if stain_norm not in (None, "none", "macenko"):
        raise InputError("--stain-norm", f"unknown method {stain_norm!r}; use macenko")
    stain_norm = None if stain_norm in (None, "none") else stain_norm
    ids = [s.slide_id for s in sources]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise InputError(out, f"duplicate slide ids {dup}")
    mapping = load_gene_mapping(gene_mapping) if gene_mapping else None
    params = PatchParams(patch_px, patch_um_per_px)
    enc = get_encoder(encoder, weights, device).with_precision(encoder_precision)
    out.mkdir(parents=True, exist_ok=True)  # every option is valid: from here on the cohort folder exists
    report = PrepareReport(out)
    transform = macenko_normaliser(stain_reference) if stain_norm == "macenko" else None
    reference = file_signature(Path(stain_reference)) if stain_reference and stain_norm else "default"
    stain_tag = None if stain_norm is None else f"{stain_norm}:{reference}"
    timings: dict[str, float] = {"threads": float(torch.get_num_threads())}

    no_image = [s.slide_id for s in sources if s.image is None and s.stored_patches is None and not s.image_in_source]
    if no_image and not allow_missing_image:
        raise InputError(
            out,
            f"{len(no_image)} slide(s) have no H&E image: {', '.join(no_image[:10])}"
            f"{' ...' if len(no_image) > 10 else ''}; choose the slides with images (--sections, --input) or pass "
            "--allow-missing-image to prepare the others and skip these",
        )
    report.skipped_no_image = list(no_image)
    todo, report.skipped_done, report.failed = pending_sources(
        [s for s in sources if s.slide_id not in no_image], out,
        lambda src: prepared_key(src, enc.cache_key, params, stain_tag), overwrite=overwrite)
    if no_image:
        say(f"{len(no_image)} slide(s) have no H&E image and are skipped: {', '.join(no_image)}")
    if report.skipped_done:
        say(f"{len(report.skipped_done)} slide(s) already prepared: {', '.join(report.skipped_done)}")
    if info.enabled:
        todo = todo[info.rank :: info.world_size]
    bar = tqdm(total=len(todo), desc=f"slides (rank {info.rank})" if info.enabled else "slides", unit="slide",
               disable=not (progress and todo))
    for src in todo:
        bar.set_postfix_str(src.slide_id)
        slide_warnings: list[str] = []
        report.warnings[src.slide_id] = slide_warnings
        try:
            prepare_slide(src, out, enc, params, batch_size=batch_size, stain_norm=stain_tag, transform=transform,
                          gene_mapping=mapping, thumbnail_size=thumbnail_size, progress=progress, timings=timings,
                          warnings=slide_warnings)
            report.prepared.append(src.slide_id)
        except MissingImageError as exc:
            if allow_missing_image:
                report.skipped_no_image.append(src.slide_id)
            else:
                report.failed[src.slide_id] = str(exc)
        except InputError as exc:
            report.failed[src.slide_id] = str(exc)
        except Exception as exc:  # report any failure of one slide; the others go on
            report.failed[src.slide_id] = f"{type(exc).__name__}: {exc}"
        bar.update(1)
    bar.close()
    report.warnings = {k: v for k, v in report.warnings.items() if v}
    for line in [f"WARNING {sid}: {m}" for sid, msgs in report.warnings.items() for m in msgs]:
        say(line)
    report.timings = timings
    if info.enabled:
        report.merge_ranks(info)
    done = [s for s in sources if s.slide_id in set(report.prepared) | set(report.skipped_done)]
    if done and info.is_master:
        t0 = time.perf_counter()
        report.manifest = finalise_cohort(
            out, [s.slide_id for s in done], encoder_name=enc.name, encoder_dim=enc.dim, params=params,
            stain_norm=stain_tag, hvg_scope=hvg_scope, train_slides=train_slides,
            skipped={s: "no image" for s in report.skipped_no_image} | report.failed)
        timings["cohort_s"] = time.perf_counter() - t0
    if info.enabled:
        barrier(info)  # the manifest exists when any rank returns
        report.manifest = out / "cohort.json" if done else None
    timings["total_s"] = time.perf_counter() - t_start
    return report
