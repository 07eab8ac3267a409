"""`hist-st prepare`: readers + patches + encoder + harmonisation for a whole cohort.

For each slide: read it (`hist_st.io`), harmonise gene names, cut spot-centred patches (`hist_st.wsi`),
embed them (`hist_st.encoders`, cached per slide + encoder + patch geometry), compute its lattice sites,
store a thumbnail, and write ``<out>/<slide_id>.h5ad`` atomically. Finished slides are skipped on a
re-run; a failing slide is reported and leaves the others alone; slides without an image are reported
and skipped. Then the cohort step restricts every slide to the shared gene set, ranks genes (HVG and
highly expressed) and writes ``<out>/cohort.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hist_st.cohort import CohortManifest
from hist_st.embed import embed_slide, load_cache, save_cache
from hist_st.encoders import get_encoder
from hist_st.errors import InputError
from hist_st.harmonise import (
    HEST_BENCH_METHOD,
    harmonise_slide,
    load_gene_mapping,
    rank_hest_bench,
    rank_highly_expressed,
    rank_hvg,
    restrict_genes,
    shared_genes,
)
from hist_st.io._util import attach_lattice, nn_distance_px
from hist_st.io.hest import read_patch_index
from hist_st.runtime import resolve_device
from hist_st.slide import Slide, read_cohort_slide, remove_stale_temporaries, write_prepared
from hist_st.sources import SlideSource, file_signature, short_hash
from hist_st.stain import macenko_normaliser
from hist_st.train.distributed import init_distributed
from hist_st.wsi import PatchParams, SlideImage, open_image, upsampling_warning

__all__ = [
    "PrepareReport",
    "prepare_cohort",
    "prepare_slide",
    "embed_slide",
    "CACHE_DIR",
]

CACHE_DIR = ".hist_st_cache"
HEST_PATCH_FIELD_UM = 112.0  # HEST-1k stored patches: 224 px at 0.5 um/px (checked per file)
PREPARE_VERSION = 1
#: Version of the lattice geometry in prepared slides (2: measured grid, `hist_st.io._util.attach_lattice`);
#: part of the prepared key only, so embedding caches stay valid.
LATTICE_VERSION = 2


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
        for sid, err in self.failed.items():
            lines.append(f"FAILED {sid}: {err}")
        for sid, msgs in self.warnings.items():
            for m in msgs:
                lines.append(f"WARNING {sid}: {m}")
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


# --------------------------------------------------------------------------------------------- embed
#: Stored and asked patch fields of view may differ by this fraction (HEST rounds the size to pixels).
STORED_FIELD_TOLERANCE = 0.02


def _use_stored_patches(slide: Slide, path: Path, params: PatchParams, *, has_wsi: bool) -> Path | None:
    """Check a HEST patch file against ``slide`` and decide how its patches are used (in place).

    The field of view comes from the file's size attributes (or, without them, from where the corners
    sit relative to the spot centres) and must match ``params.field_um``; otherwise patches are cut from
    the WSI, or the slide is refused when there is none. Every stored corner must sit half a patch before
    its spot centre (a file cut at another size or resolution would be mis-scaled). Spots without a stored
    patch (HEST keeps only patches with >= 15% tissue) are dropped, as HEST-Benchmark does (by barcode),
    and the number is recorded in ``slide.meta['spots_without_stored_patch']``.

    Returns:
        ``path`` when the stored patches are used, None when patches are to be cut from the WSI.

    Raises:
        InputError: no spot has a stored patch; corners off the spot centres; another field of view
            and no WSI.
    """

    index = read_patch_index(path)
    pos = {str(b): i for i, b in enumerate(index.barcodes)}
    rows = np.asarray([pos.get(str(b), -1) for b in slide.barcodes], dtype=np.int64)
    have = rows >= 0
    if not have.any():
        raise InputError(path, f"none of the {slide.n_spots} spots of the sample has a stored patch (barcodes differ)")
    centres = np.asarray(slide.spatial, dtype=np.float64)[have]
    field, how = index.field_um(slide.um_per_px, centres)
    half_px = field / slide.um_per_px / 2.0
    off = np.abs(centres - half_px - index.coords[rows[have]]).max()
    if off > max(2.0, 0.05 * 2 * half_px):
        raise InputError(
            path,
            f"stored patch corners are up to {off:.1f} px away from half a patch ({half_px:.1f} px) before their "
            f"spot centres; the patches were cut at another size or resolution than {how} says",
        )
    slide.meta["stored_patches"] = {"field_um": field, "field_from": how, "size_px": index.size_px}
    # HEST rounds corners to whole pixels: allow 2 WSI pixels besides the relative tolerance
    if abs(field - params.field_um) > max(STORED_FIELD_TOLERANCE * params.field_um, 2.0 * slide.um_per_px):
        if not has_wsi:
            raise InputError(
                path,
                f"stored patches cover {field:.1f} um ({how}) but {params.field_um:g} um were asked "
                "and there is no WSI to cut them from",
            )
        slide.meta["patches_from_wsi_because"] = f"stored patches cover {field:.1f} um, {params.field_um:g} um asked"
        return None
    n_missing = int((~have).sum())
    if n_missing:
        slide.take_spots(have)
        slide.meta["spots_without_stored_patch"] = {
            "dropped": n_missing,
            "kept": int(have.sum()),
            "why": "HEST stores patches only for spots with >= 15% tissue; spots without one are dropped, "
            "as HEST-Benchmark does (matched by barcode)",
        }
        warnings.warn(
            f"slide {slide.slide_id!r}: {n_missing} of {len(have)} spots have no stored patch in {path} "
            "(HEST keeps patches with >= 15% tissue); they are dropped, as in HEST-Benchmark",
            stacklevel=2,
        )
    return path


def _cache_path(
    out_dir: Path, slide: Slide, src: SlideSource, encoder, params: PatchParams, stain: str | None
) -> Path:
    key = short_hash(
        PREPARE_VERSION,
        encoder.cache_key,
        params.as_dict(),
        stain,
        src.fingerprint,
        file_signature(Path(slide.image) if slide.image else None),
        file_signature(src.stored_patches),
        float(slide.um_per_px or 0),
        hashlib.sha1(np.ascontiguousarray(slide.spatial, dtype=np.float64).tobytes()).hexdigest(),
    )
    return out_dir / CACHE_DIR / slide.slide_id / f"{encoder.name}-{key}.npz"


def _prepared_key(src: SlideSource, encoder_key: str, params: PatchParams, stain: str | None) -> str:
    return short_hash(PREPARE_VERSION, LATTICE_VERSION, src.fingerprint, encoder_key, params.as_dict(), stain)


def _existing_key(path: Path) -> str | None:
    """The ``prepare_key`` recorded in a prepared slide, read cheaply with h5py (None if absent/corrupt).

    A prediction file (``meta['prediction']``) is never a finished prepared slide, even when an older
    hist-st copied the key into it: None, so the slide is prepared again.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f["uns/hist_st/meta_json"][()]
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        return None if "prediction" in meta else meta.get("prepare_key")
    except Exception:
        return None


def _foreign_file(path: Path) -> bool:
    """True when ``path`` is a readable HDF5/AnnData file that hist-st did not write (no ``uns/hist_st``).

    Unreadable files (half-written or garbage outputs) are not foreign: preparing replaces them.
    """
    import h5py

    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return "uns/hist_st" not in f
    except Exception:  # noqa: BLE001 - not HDF5: a damaged output, not a source
        return False


def prepare_slide(
    src: SlideSource,
    out_dir: Path,
    encoder,
    params: PatchParams,
    *,
    batch_size: int = 32,
    stain_norm: str | None = None,
    transform: Callable | None = None,
    gene_mapping: dict | None = None,
    thumbnail_size: int = 1024,
    progress: bool = True,
    timings: dict | None = None,
    warnings: list[str] | None = None,
) -> Path:
    """Prepare one slide and write ``<out_dir>/<slide_id>.h5ad`` atomically; returns its path.

    ``warnings`` (when given) receives the slide's warnings (e.g. patches enlarged from a low-resolution
    image); they are also recorded in the slide's ``meta['warnings']``.
    """

    timings = timings if timings is not None else {}
    warnings = warnings if warnings is not None else []
    slide = src.load()
    slide.slide_id = src.slide_id
    if src.patient and not slide.patient:
        slide.patient = src.patient
    symbols = slide.meta.pop("_gene_symbols", None)
    harmonise_slide(slide, symbols=symbols, mapping=gene_mapping)
    image = None
    try:
        if slide.image:
            if "#" not in slide.image:
                slide.image = str(Path(slide.image).resolve())
            image = open_image(slide.image, scale=slide.image_scale)
            if slide.um_per_px is None:
                slide.um_per_px = _recorded_um_per_px(image)
                slide.meta["um_per_px_source"] = "recorded in the image file"
            if slide.um_per_px is None:
                raise InputError(
                    slide.image, "no um per pixel in the image or the slide metadata; pass --um-per-px"
                )
            image.um_per_px = slide.um_per_px
            _check_spots_inside(slide, image)
            _record_image_resolution(slide, image, params, warnings)
            if not slide.spatial_images:  # Visium keeps its original hires/lowres images instead
                t0 = time.perf_counter()
                slide.thumbnail, slide.thumbnail_scale = image.thumbnail(thumbnail_size)
                timings["thumbnail_s"] = timings.get("thumbnail_s", 0.0) + time.perf_counter() - t0
        elif src.stored_patches is None:
            raise MissingImageError(
                f"slide {slide.slide_id!r}",
                "has no H&E image to cut patches from: give --image (full resolution, or a Space Ranger "
                "hires/lowres image), or --allow-missing-image to skip such slides",
            )
        if slide.um_per_px is None:
            raise InputError(
                f"slide {slide.slide_id!r}", "no um per pixel known (no image resolution); pass --um-per-px"
            )
        _fill_pitch(slide)
        stored = src.stored_patches
        if stored is not None:
            stored = _use_stored_patches(slide, stored, params, has_wsi=image is not None)
        if stored is not None:
            slide.meta["patches_from"] = str(stored)
        cache = _cache_path(out_dir, slide, src, encoder, params, stain_norm)
        cached = load_cache(cache, slide.n_spots, timings)
        if cached is not None:
            emb, outside = cached
            timings["cached_slides"] = timings.get("cached_slides", 0) + 1
        else:
            emb, outside = embed_slide(
                slide,
                image,
                encoder,
                params,
                batch_size=batch_size,
                transform=transform,
                stored_patches=stored,
                progress=progress,
                timings=timings,
            )
            save_cache(cache, emb, outside)
    finally:
        if image is not None:
            image.close()
    slide.embeddings[encoder.name] = emb
    slide.patch_outside = outside
    attach_lattice(slide)
    grid_warning = (slide.meta.get("grid_check") or {}).get("warning")
    if grid_warning:
        warnings.append(grid_warning)
    slide.meta.update(
        prepare_key=_prepared_key(src, encoder.cache_key, params, stain_norm),
        patch=params.as_dict(),
        stain_norm=stain_norm,
        encoder=encoder.name,
        encoder_weights=encoder.weights_id,
        n_patch_outside=int(outside.sum()),
        warnings=list(warnings),
    )
    return write_prepared(slide, out_dir / f"{slide.slide_id}.h5ad")


def _recorded_um_per_px(image: SlideImage) -> float | None:
    """Full-resolution um/px recorded in the file (a scaled copy's own um/px times its scale)."""
    inner = getattr(image, "inner", None)
    if inner is not None:
        return inner.um_per_px * image.scale if inner.um_per_px else None
    return image.um_per_px


def _record_image_resolution(slide: Slide, image: SlideImage, params: PatchParams, warnings: list[str]) -> None:
    """Record the real resolution behind the patches; warn when patches are enlarged > 2x from it."""
    source = float(image.source_um_per_px)
    slide.meta.update(
        image_scale=float(slide.image_scale or 1.0),
        source_um_per_px=source,
        patch_upsampling=source / params.um_per_px,
    )
    what = f"the image ({Path(str(image.path)).name}, scale {slide.image_scale or 1.0:g} of full resolution)"
    warning = upsampling_warning(source, params.um_per_px, what)
    if warning:
        warnings.append(warning)


def _fill_pitch(slide: Slide) -> None:
    """Unknown technology: spot pitch from the median nearest-neighbour distance; lattice unit = pitch."""

    if slide.spot_pitch_um is None:
        slide.spot_pitch_um = float(nn_distance_px(slide.spatial) * slide.um_per_px)
        slide.meta["spot_pitch_source"] = "median nearest-neighbour distance of spot centres"
    if slide.lattice_unit_um is None:
        slide.lattice_unit_um = slide.spot_pitch_um


def _check_spots_inside(slide: Slide, image: SlideImage) -> None:
    """Every spot centre must lie inside the image (in full-resolution pixels); name the ones that do not."""
    xy = slide.spatial
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < image.width) & (xy[:, 1] < image.height)
    if inside.all():
        slide.meta["spot_centres_outside_image"] = 0
        return
    bad = np.flatnonzero(~inside)
    first = ", ".join(f"{slide.barcodes[i]} at ({xy[i, 0]:.0f}, {xy[i, 1]:.0f})" for i in bad[:3])
    hint = (
        "wrong image, or positions in another resolution (a hires/lowres image needs its scale factor: "
        "--image-scale)"
        if not inside.any() or (~inside).mean() > 0.5
        else "the image is cropped, or those positions are wrong"
    )
    raise InputError(
        image.path,
        f"{len(bad)} of {len(xy)} spot centres lie outside the image ({image.width} x {image.height} "
        f"full-resolution px): {first}; {hint}",
    )


# --------------------------------------------------------------------------------------------- cohort
def prepare_cohort(
    sources: Sequence[SlideSource],
    out_dir: str | Path,
    *,
    encoder: str = "efficientnet-lite0",
    weights: str | Path | None = None,
    device: str | None = None,
    patch_px: int = 224,
    patch_um_per_px: float = 0.5,
    batch_size: int = 32,
    encoder_precision: str = "fp32",
    stain_norm: str | None = None,
    stain_reference: str | Path | None = None,
    gene_mapping: str | Path | None = None,
    hvg_scope: str = "dataset",
    train_slides: Sequence[str] | None = None,
    thumbnail_size: int = 1024,
    overwrite: bool = False,
    allow_missing_image: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    dist_info=None,
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
    import torch

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
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise InputError(out, f"duplicate slide ids {sorted(dup)}")
    mapping = load_gene_mapping(gene_mapping) if gene_mapping else None
    params = PatchParams(patch_px, patch_um_per_px)
    enc = get_encoder(encoder, weights, device).with_precision(encoder_precision)
    out.mkdir(parents=True, exist_ok=True)  # every option is valid: from here on the cohort folder exists
    report = PrepareReport(out)
    transform = macenko_normaliser(stain_reference) if stain_norm == "macenko" else None
    stain_tag = (
        None
        if stain_norm is None
        else f"{stain_norm}:{file_signature(Path(stain_reference)) if stain_reference else 'default'}"
    )
    timings: dict[str, float] = {"threads": float(torch.get_num_threads())}

    todo = []
    no_image = [s.slide_id for s in sources if s.image is None and s.stored_patches is None and not s.image_in_source]
    if no_image and not allow_missing_image:
        raise InputError(
            out,
            f"{len(no_image)} slide(s) have no H&E image: {', '.join(no_image[:10])}"
            f"{' ...' if len(no_image) > 10 else ''}; choose the slides with images (--sections, --input) or pass "
            "--allow-missing-image to prepare the others and skip these",
        )
    for src in sources:
        if src.slide_id in no_image:
            report.skipped_no_image.append(src.slide_id)
            continue
        dest = out / f"{src.slide_id}.h5ad"
        remove_stale_temporaries(dest)  # left by an interrupted run, even when the slide itself is done
        if (
            not overwrite
            and dest.is_file()
            and _existing_key(dest) == _prepared_key(src, enc.cache_key, params, stain_tag)
        ):
            report.skipped_done.append(src.slide_id)
            continue
        if _foreign_file(dest):  # never replace a source file (e.g. an input .h5ad inside --out)
            report.failed[src.slide_id] = str(InputError(
                dest, "exists and is not a hist-st prepared slide (an input file?); it is never replaced: "
                "choose another --out folder or move the file"))  # fmt: skip
            continue
        todo.append(src)
    if report.skipped_no_image:
        say(
            f"{len(report.skipped_no_image)} slide(s) have no H&E image and are skipped: {', '.join(report.skipped_no_image)}"
        )
    if report.skipped_done:
        say(f"{len(report.skipped_done)} slide(s) already prepared: {', '.join(report.skipped_done)}")
    if info.enabled:
        todo = todo[info.rank :: info.world_size]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"slides (rank {info.rank})" if info.enabled else "slides", unit="slide")
    for src in todo:
        if bar is not None:
            bar.set_postfix_str(src.slide_id)
        slide_warnings: list[str] = []
        report.warnings[src.slide_id] = slide_warnings
        try:
            prepare_slide(
                src,
                out,
                enc,
                params,
                batch_size=batch_size,
                stain_norm=stain_tag,
                transform=transform,
                gene_mapping=mapping,
                thumbnail_size=thumbnail_size,
                progress=progress,
                timings=timings,
                warnings=slide_warnings,
            )
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
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    report.warnings = {k: v for k, v in report.warnings.items() if v}
    for sid, msgs in report.warnings.items():
        for m in msgs:
            say(f"WARNING {sid}: {m}")
    if info.enabled:
        _merge_rank_reports(report, timings)
    done = [s for s in sources if s.slide_id in set(report.prepared) | set(report.skipped_done)]
    if done and info.is_master:
        t0 = time.perf_counter()
        report.manifest = finalise_cohort(
            out,
            [s.slide_id for s in done],
            encoder_name=enc.name,
            encoder_dim=enc.dim,
            params=params,
            stain_norm=stain_tag,
            hvg_scope=hvg_scope,
            train_slides=train_slides,
            skipped={s: "no image" for s in report.skipped_no_image} | report.failed,
        )
        timings["cohort_s"] = time.perf_counter() - t0
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()  # the manifest exists when any rank returns
        report.manifest = out / "cohort.json" if done else None
    timings["total_s"] = time.perf_counter() - t_start
    report.timings = timings
    return report


def _merge_rank_reports(report: PrepareReport, timings: dict[str, float]) -> None:
    """Every rank's prepared/failed/warnings and summed timings, in place (after a barrier)."""
    import torch.distributed as dist

    mine = (report.prepared, report.failed, report.warnings, report.skipped_no_image, timings)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    report.prepared = [s for p in parts for s in p[0]]
    report.failed = {k: v for p in parts for k, v in p[1].items()}
    report.warnings = {k: v for p in parts for k, v in p[2].items()}
    report.skipped_no_image = sorted({s for p in parts for s in p[3]})
    for key in ("extract_s", "encode_s", "patches", "cached_slides", "thumbnail_s"):
        if any(key in p[4] for p in parts):
            timings[key] = sum(p[4].get(key, 0.0) for p in parts)


def finalise_cohort(
    out_dir: str | Path,
    slide_ids: Sequence[str],
    *,
    encoder_name: str,
    encoder_dim: int,
    params: PatchParams,
    stain_norm: str | None = None,
    hvg_scope: str = "dataset",
    train_slides: Sequence[str] | None = None,
    skipped: dict[str, str] | None = None,
) -> Path:
    """Restrict prepared slides to their shared genes (rewriting those that change) and write ``cohort.json``."""
    out = Path(out_dir)
    slides = {sid: read_cohort_slide(out / f"{sid}.h5ad") for sid in slide_ids}
    genes = shared_genes(s.genes for s in slides.values())
    if not genes:
        raise InputError(out, "the prepared slides share no gene")
    for sid, s in slides.items():
        if list(map(str, s.genes)) != genes:
            restrict_genes(s, genes)
            write_prepared(s, out / f"{sid}.h5ad")
    mats = {sid: s.counts for sid, s in slides.items()}
    hvg_dataset = rank_hvg(list(mats.values()), genes)
    if hvg_scope == "train-only":
        unknown = set(train_slides or []) - set(mats)
        if unknown:
            raise InputError("--train-slides", f"not among the prepared slides: {sorted(unknown)}")
        hvg = rank_hvg([mats[s] for s in train_slides], genes)
        he = rank_highly_expressed([mats[s] for s in train_slides], genes)
    else:
        hvg, he = hvg_dataset, rank_highly_expressed(list(mats.values()), genes)
    embedding_dims: dict[str, int] = {}
    for s in slides.values():
        for k, v in s.embeddings.items():
            embedding_dims[k] = int(v.shape[1])
    embedding_dims.setdefault(encoder_name, encoder_dim)
    techs = sorted({s.technology for s in slides.values()})
    units = sorted({s.lattice_unit_um for s in slides.values() if s.lattice_unit_um})
    pitches = sorted({s.spot_pitch_um for s in slides.values() if s.spot_pitch_um})
    old_skipped = {}
    try:
        old_skipped = (CohortManifest.read(out) or {}).get("skipped", {})
    except InputError:
        pass
    skipped = {k: v for k, v in {**old_skipped, **(skipped or {})}.items() if k not in slides}
    manifest = {
        "format": "hist-st-cohort",
        "version": 1,
        "slide_ids": list(slides),
        "patients": {sid: s.patient for sid, s in slides.items()},
        "slides": [
            {
                "slide_id": sid,
                "file": f"{sid}.h5ad",
                "patient": s.patient,
                "n_spots": s.n_spots,
                "technology": s.technology,
                "um_per_px": s.um_per_px,
                "spot_pitch_um": s.spot_pitch_um,
                "lattice_unit_um": s.lattice_unit_um,
                "grid_kind": (s.meta.get("spot_grid") or {}).get("kind"),
                "neighbour_adjacency": (s.meta.get("neighbour_adjacency") or {}).get("share"),
                "n_patch_outside": int(np.asarray(s.patch_outside).sum())
                if s.patch_outside is not None
                else 0,
                "image_scale": s.meta.get("image_scale"),
                "source_um_per_px": s.meta.get("source_um_per_px"),
                "patch_upsampling": s.meta.get("patch_upsampling"),
                "warnings": list(s.meta.get("warnings", [])),
            }
            for sid, s in slides.items()
        ],
        "genes": genes,
        "n_genes": len(genes),
        "hvg": hvg,
        "hvg_scope": hvg_scope,
        "hvg_train_slides": list(train_slides) if hvg_scope == "train-only" else None,
        "hvg_dataset": hvg_dataset,
        "hvg_method": "scanpy highly_variable_genes flavor=seurat on normalize_total(1e4)+log1p, by dispersions_norm",
        "highly_expressed": he,
        "highly_expressed_method": "mean of normalize_total(1e4)+log1p over spots",
        "hest-bench": rank_hest_bench(list(mats.values()), genes),
        "hest-bench_method": HEST_BENCH_METHOD,
        "encoders": sorted(embedding_dims),
        "embedding_dims": embedding_dims,
        "technology": techs[0] if len(techs) == 1 else techs,
        "lattice_unit_um": units[0] if len(units) == 1 else units,
        "spot_pitch_um": pitches[0] if len(pitches) == 1 else pitches,
        "patch": params.as_dict(),
        "stain_norm": stain_norm,
        "skipped": skipped,
        "warnings": {sid: list(s.meta["warnings"]) for sid, s in slides.items() if s.meta.get("warnings")},
    }
    return CohortManifest.write(out, manifest)
