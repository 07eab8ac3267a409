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

from hist_st.errors import InputError
from hist_st.harmonise import (
    harmonise_slide,
    rank_highly_expressed,
    rank_hvg,
    read_cohort_manifest,
    restrict_genes,
    shared_genes,
    write_cohort_manifest,
)
from hist_st.slide import Slide, atomic_write, read_cohort_slide, remove_stale_temporaries, write_prepared
from hist_st.wsi import PatchParams, SlideImage, iter_patch_batches, open_image

__all__ = [
    "SlideSource",
    "PrepareReport",
    "prepare_cohort",
    "prepare_slide",
    "sources_from_her2st",
    "sources_from_hest",
    "source_from_spaceranger",
    "source_from_anndata",
    "sources_from_table",
    "embed_slide",
    "embed_he_slide",
    "macenko_normaliser",
    "CACHE_DIR",
]

CACHE_DIR = ".hist_st_cache"
HEST_PATCH_FIELD_UM = 112.0  # HEST-1k stored patches: 224 px at 0.5 um/px
PREPARE_VERSION = 1


@dataclass
class SlideSource:
    """A slide to prepare: an id, a loader returning its `Slide`, and its image (None: no image).

    Attributes:
        slide_id: Output file stem.
        load: Callable returning the `Slide` (counts, coordinates, ...); called only when needed.
        image: H&E image path or None.
        patient: Patient id.
        stored_patches: Optional HEST ``patches/<id>.h5`` (224 px at 0.5 um/px, matched by barcode).
        fingerprint: Identifies the inputs (paths, sizes, mtimes): a change re-prepares the slide.
    """

    slide_id: str
    load: Callable[[], Slide]
    image: Path | None
    patient: str | None = None
    stored_patches: Path | None = None
    fingerprint: str = ""


@dataclass
class PrepareReport:
    """What `prepare_cohort` did; ``timings`` holds seconds and patch counts for throughput."""

    out_dir: Path
    prepared: list[str] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)
    skipped_no_image: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
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


def _file_sig(path: Path | None) -> str:
    if path is None:
        return "none"
    try:
        st = Path(path).stat()
        return f"{Path(path).resolve()}:{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        return f"{path}:missing"


def _hash(*parts: object) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- sources
def sources_from_her2st(root: str | Path, sections: Sequence[str] | None = None) -> list[SlideSource]:
    """One source per section of a her2st-layout folder (``sections`` restricts the ids)."""
    from hist_st.io.legacy_st import find_her2st_sections, read_her2st_section

    out = []
    for sec in find_her2st_sections(root):
        if sections and sec.slide_id not in sections:
            continue
        out.append(
            SlideSource(
                sec.slide_id,
                (lambda s=sec: read_her2st_section(s)),
                sec.image,
                sec.patient,
                fingerprint=_hash(_file_sig(sec.counts), _file_sig(sec.spots), _file_sig(sec.image)),
            )
        )
    if sections:
        unknown = set(sections) - {s.slide_id for s in out}
        if unknown:
            raise InputError(root, f"sections not found: {sorted(unknown)}")
    return out


def sources_from_hest(root: str | Path, ids: Sequence[str] | None = None) -> list[SlideSource]:
    """One source per HEST-1k sample under ``root`` (``st/<id>.h5ad``)."""
    from hist_st.io.hest import find_hest_samples, read_hest

    out = []
    for s in find_hest_samples(root):
        if ids and s.sample_id not in ids:
            continue
        out.append(
            SlideSource(
                s.sample_id,
                (lambda s=s: read_hest(s.root, s.sample_id)),
                s.wsi,
                s.patient,
                stored_patches=s.patches,
                fingerprint=_hash(
                    _file_sig(s.st), _file_sig(s.wsi), _file_sig(s.patches), _file_sig(s.metadata)
                ),
            )
        )
    return out


def source_from_spaceranger(
    outs: str | Path, image: str | Path | None, slide_id: str | None = None, patient: str | None = None
) -> SlideSource:
    """A Space Ranger ``outs/`` folder plus its full-resolution image."""
    from hist_st.io.spaceranger import read_spaceranger

    outs = Path(outs)
    sid = slide_id or (outs.parent.name if outs.name == "outs" else outs.name)
    img = Path(image) if image else None
    return SlideSource(
        sid,
        lambda: read_spaceranger(outs, img, slide_id=sid, patient=patient),
        img,
        patient,
        fingerprint=_hash(_file_sig(outs), _file_sig(img)),
    )


def source_from_anndata(
    path: str | Path,
    image: str | Path | None,
    slide_id: str | None = None,
    patient: str | None = None,
    um_per_px: float | None = None,
    spot_pitch_um: float | None = None,
    technology: str | None = None,
) -> SlideSource:
    """Any AnnData ``.h5ad`` with ``obsm['spatial']`` plus an image."""
    from hist_st.io.anndata_reader import read_anndata

    path = Path(path)
    sid = slide_id or path.stem
    img = Path(image) if image else None
    return SlideSource(
        sid,
        lambda: read_anndata(
            path,
            img,
            slide_id=sid,
            patient=patient,
            um_per_px=um_per_px,
            spot_pitch_um=spot_pitch_um,
            technology=technology,
        ),
        img,
        patient,
        fingerprint=_hash(_file_sig(path), _file_sig(img), um_per_px, spot_pitch_um),
    )


def sources_from_table(table: str | Path, fmt: str) -> list[SlideSource]:
    """Sources from a CSV/TSV with columns ``path`` and optional ``image, slide_id, patient, um_per_px``."""
    import pandas as pd

    table = Path(table)
    try:
        df = pd.read_csv(table, sep=None, engine="python", dtype=str).fillna("")
    except Exception as exc:
        raise InputError(table, f"cannot read the sample table ({exc})") from exc
    if "path" not in df.columns:
        raise InputError(
            table, "the sample table needs a 'path' column (and optionally image, slide_id, patient)"
        )
    out = []
    for _, row in df.iterrows():
        base = table.parent
        path = base / row["path"]
        image = (base / row["image"]) if row.get("image") else None
        sid = row.get("slide_id") or None
        patient = row.get("patient") or None
        if fmt == "spaceranger":
            out.append(source_from_spaceranger(path, image, sid, patient))
        elif fmt == "anndata":
            upp = float(row["um_per_px"]) if row.get("um_per_px") else None
            out.append(source_from_anndata(path, image, sid, patient, upp))
        else:
            raise InputError(table, f"sample tables are for spaceranger/anndata inputs, not {fmt!r}")
    return out


# --------------------------------------------------------------------------------------------- stain
def macenko_normaliser(reference: str | Path | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A batch transform uint8 ``[B, H, W, 3]`` -> uint8 that applies torchstain's Macenko normalisation.

    Args:
        reference: Optional reference H&E image to fit the target stain matrix; default: torchstain's
            standard reference stain vectors.

    Patches the method cannot normalise (background, too little tissue) are left unchanged.
    """
    import torch
    import torchstain

    norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    if reference is not None:
        img = open_image(reference)
        try:
            thumb, _ = img.thumbnail(1024)
        finally:
            img.close()
        norm.fit(torch.from_numpy(np.ascontiguousarray(thumb)).permute(2, 0, 1).float())

    def apply(batch: np.ndarray) -> np.ndarray:
        out = batch.copy()
        for i in range(len(batch)):
            try:
                t = torch.from_numpy(np.ascontiguousarray(batch[i])).permute(2, 0, 1).float()
                res, _, _ = norm.normalize(I=t, stains=False)
                arr = res.clamp(0, 255).round().to(torch.uint8).numpy()
                if np.isfinite(res.numpy()).all():
                    out[i] = arr
            except Exception:  # torchstain raises on near-empty patches (no stain to estimate)
                continue
        return out

    return apply


# --------------------------------------------------------------------------------------------- embed
def _read_stored_patches(path: Path, barcodes: np.ndarray) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            bcs = np.asarray(f["barcode"][:]).reshape(-1)
            bcs = np.asarray([b.decode() if isinstance(b, bytes) else str(b) for b in bcs], dtype=object)
            index = {b: i for i, b in enumerate(bcs)}
            rows = [index.get(str(b), -1) for b in barcodes]
            if min(rows, default=0) < 0:
                missing = int(sum(r < 0 for r in rows))
                raise InputError(path, f"{missing} spots have no stored patch (barcodes do not match st/)")
            order = np.argsort(rows)
            img = f["img"]
            sorted_rows = np.asarray(rows)[order]
            data = (
                img[sorted_rows]
                if len(set(sorted_rows)) == len(sorted_rows)
                else np.stack([img[r] for r in rows])
            )
            if len(set(sorted_rows)) == len(sorted_rows):
                out = np.empty_like(data)
                out[order] = data
                data = out
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"cannot read stored patches ({type(exc).__name__}: {exc})") from exc
    return np.asarray(data, dtype=np.uint8)


def embed_slide(
    slide: Slide,
    image: SlideImage | None,
    encoder,
    params: PatchParams,
    *,
    batch_size: int = 32,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    stored_patches: Path | None = None,
    progress: bool = True,
    timings: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every spot of ``slide``.

    Returns:
        ``(embeddings float32 [N, C], patch_outside bool [N])``.
    """
    timings = timings if timings is not None else {}
    n = slide.n_spots
    emb = np.empty((n, encoder.dim), dtype=np.float32)
    outside = np.zeros(n, dtype=bool)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"{slide.slide_id} patches", unit="patch", leave=False)
    if stored_patches is not None:
        t0 = time.perf_counter()
        patches = _read_stored_patches(stored_patches, slide.barcodes)
        if patches.shape[1] != params.size_px:
            from PIL import Image

            patches = np.stack(
                [
                    np.asarray(Image.fromarray(p).resize((params.size_px,) * 2, Image.Resampling.BILINEAR))
                    for p in patches
                ]
            )
        timings["extract_s"] = timings.get("extract_s", 0.0) + time.perf_counter() - t0
        batches = (
            (patches[i : i + batch_size], np.zeros(len(patches[i : i + batch_size]), bool))
            for i in range(0, n, batch_size)
        )
    else:
        if image is None:
            raise InputError(f"slide {slide.slide_id!r}", "no image to cut patches from")
        batches = iter_patch_batches(image, slide.spatial, slide.um_per_px, params, batch_size=batch_size)
    start = 0
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            b, out = next(it)
        except StopIteration:
            break
        if transform is not None:
            b = transform(b)
        t1 = time.perf_counter()
        emb[start : start + len(b)] = encoder.encode(b)
        t2 = time.perf_counter()
        outside[start : start + len(b)] = out
        start += len(b)
        timings["extract_s"] = timings.get("extract_s", 0.0) + (t1 - t0)
        timings["encode_s"] = timings.get("encode_s", 0.0) + (t2 - t1)
        timings["patches"] = timings.get("patches", 0.0) + len(b)
        if bar is not None:
            bar.update(len(b))
    if bar is not None:
        bar.close()
    if not np.all(np.isfinite(emb)):
        raise InputError(f"slide {slide.slide_id!r}", "the encoder produced NaN/inf embeddings")
    return emb, outside


def embed_he_slide(
    slide: Slide,
    *,
    encoder: str = "efficientnet-lite0",
    weights: str | Path | None = None,
    device: str | None = None,
    patch_px: int = 224,
    patch_um_per_px: float = 0.5,
    batch_size: int = 32,
    stain_norm: str | None = None,
    progress: bool = True,
) -> Slide:
    """Embed the spots of a slide that has an image (e.g. from `hist_st.tissue.pseudo_spot_grid`), in place.

    Sets ``slide.embeddings[encoder]`` and ``slide.patch_outside`` and returns the slide; for
    ``hist-st predict --image``. Use the encoder and patch geometry the model was trained with.
    """
    from hist_st.encoders import get_encoder

    if not slide.image:
        raise InputError(f"slide {slide.slide_id!r}", "the slide has no image to cut patches from")
    enc = get_encoder(encoder, weights, device)
    transform = macenko_normaliser() if stain_norm == "macenko" else None
    with open_image(slide.image) as image:
        upp = slide.um_per_px or image.um_per_px
        if upp is None:
            raise InputError(slide.image, "no um per pixel in the image or the slide; give it explicitly")
        slide.um_per_px = upp
        emb, outside = embed_slide(
            slide,
            image,
            enc,
            PatchParams(patch_px, patch_um_per_px),
            batch_size=batch_size,
            transform=transform,
            progress=progress,
        )
    slide.embeddings[enc.name] = emb
    slide.patch_outside = outside
    slide.meta.update(
        patch={"size_px": patch_px, "um_per_px": patch_um_per_px},
        encoder=enc.name,
        encoder_weights=enc.weights_id,
        stain_norm=stain_norm,
    )
    return slide


def _cache_path(
    out_dir: Path, slide: Slide, src: SlideSource, encoder, params: PatchParams, stain: str | None
) -> Path:
    key = _hash(
        PREPARE_VERSION,
        encoder.cache_key,
        params.as_dict(),
        stain,
        src.fingerprint,
        _file_sig(Path(slide.image) if slide.image else None),
        _file_sig(src.stored_patches),
        float(slide.um_per_px or 0),
        hashlib.sha1(np.ascontiguousarray(slide.spatial, dtype=np.float64).tobytes()).hexdigest(),
    )
    return out_dir / CACHE_DIR / slide.slide_id / f"{encoder.name}-{key}.npz"


def _save_npz_atomic(path: Path, **arrays) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _load_cache(path: Path, n_spots: int, timings: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """Embeddings ``[N, C]`` and patch-outside flags ``[N]`` from a cache file, or None when absent.

    A damaged cache file (unreadable, missing arrays, wrong shapes, non-finite values) is reported with a
    warning naming it, deleted, and None is returned so the slide is embedded again.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            emb, outside = np.asarray(z["emb"]), np.asarray(z["outside"], dtype=bool)
        if emb.ndim != 2 or emb.shape[0] != n_spots or outside.shape != (n_spots,):
            raise ValueError(f"arrays of shape {emb.shape} and {outside.shape} for {n_spots} spots")
        if not np.isfinite(emb).all():
            raise ValueError("non-finite embeddings")
        return emb, outside
    except Exception as exc:  # noqa: BLE001 - zip, pickle and shape errors alike mean "rebuild"
        reason = "not an .npz archive" if "pickle" in str(exc) else f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"{path}: damaged embedding cache ({reason}); deleted, embedding the slide again",
            RuntimeWarning,
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        timings["cache_rebuilt"] = timings.get("cache_rebuilt", 0) + 1
        return None


def _prepared_key(src: SlideSource, encoder_key: str, params: PatchParams, stain: str | None) -> str:
    return _hash(PREPARE_VERSION, src.fingerprint, encoder_key, params.as_dict(), stain)


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
) -> Path:
    """Prepare one slide and write ``<out_dir>/<slide_id>.h5ad`` atomically; returns its path."""
    from hist_st.io._util import attach_lattice

    timings = timings if timings is not None else {}
    slide = src.load()
    slide.slide_id = src.slide_id
    if src.patient and not slide.patient:
        slide.patient = src.patient
    symbols = slide.meta.pop("_gene_symbols", None)
    harmonise_slide(slide, symbols=symbols, mapping=gene_mapping)
    image = None
    try:
        if slide.image:
            slide.image = str(Path(slide.image).resolve())
            image = open_image(slide.image)
            if slide.um_per_px is None:
                slide.um_per_px = image.um_per_px
                slide.meta["um_per_px_source"] = "recorded in the image file"
            if slide.um_per_px is None:
                raise InputError(
                    slide.image, "no um per pixel in the image or the slide metadata; pass --um-per-px"
                )
            _check_spots_inside(slide, image)
            t0 = time.perf_counter()
            slide.thumbnail, slide.thumbnail_scale = image.thumbnail(thumbnail_size)
            timings["thumbnail_s"] = timings.get("thumbnail_s", 0.0) + time.perf_counter() - t0
        if slide.um_per_px is None:
            raise InputError(
                f"slide {slide.slide_id!r}", "no um per pixel known (no image resolution); pass --um-per-px"
            )
        _fill_pitch(slide)
        stored = src.stored_patches
        if stored is not None and abs(params.field_um - HEST_PATCH_FIELD_UM) > 1e-6:
            if image is None:
                raise InputError(
                    stored,
                    f"stored patches cover {HEST_PATCH_FIELD_UM:g} um but {params.field_um:g} um were asked "
                    "and there is no WSI to cut them from",
                )
            stored = None
        if stored is not None:
            slide.meta["patches_from"] = str(stored)
        cache = _cache_path(out_dir, slide, src, encoder, params, stain_norm)
        cached = _load_cache(cache, slide.n_spots, timings)
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
            _save_npz_atomic(cache, emb=emb, outside=outside)
    finally:
        if image is not None:
            image.close()
    slide.embeddings[encoder.name] = emb
    slide.patch_outside = outside
    attach_lattice(slide)
    slide.meta.update(
        prepare_key=_prepared_key(src, encoder.cache_key, params, stain_norm),
        patch=params.as_dict(),
        stain_norm=stain_norm,
        encoder=encoder.name,
        encoder_weights=encoder.weights_id,
        n_patch_outside=int(outside.sum()),
    )
    return write_prepared(slide, out_dir / f"{slide.slide_id}.h5ad")


def _fill_pitch(slide: Slide) -> None:
    """Unknown technology: spot pitch from the median nearest-neighbour distance; lattice unit = pitch."""
    from hist_st.io._util import nn_distance_px

    if slide.spot_pitch_um is None:
        slide.spot_pitch_um = float(nn_distance_px(slide.spatial) * slide.um_per_px)
        slide.meta["spot_pitch_source"] = "median nearest-neighbour distance of spot centres"
    if slide.lattice_unit_um is None:
        slide.lattice_unit_um = slide.spot_pitch_um


def _check_spots_inside(slide: Slide, image: SlideImage) -> None:
    xy = slide.spatial
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < image.width) & (xy[:, 1] < image.height)
    if not inside.any():
        raise InputError(
            image.path,
            f"no spot centre lies inside the image ({image.width} x {image.height} px); wrong image or coordinates "
            "in another resolution (hires/lowres instead of full resolution?)",
        )
    if (~inside).mean() > 0.5:
        raise InputError(
            image.path,
            f"{int((~inside).sum())} of {len(xy)} spot centres lie outside the image; wrong image?",
        )
    slide.meta["spot_centres_outside_image"] = int((~inside).sum())


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
    stain_norm: str | None = None,
    stain_reference: str | Path | None = None,
    gene_mapping: str | Path | None = None,
    hvg_scope: str = "dataset",
    train_slides: Sequence[str] | None = None,
    thumbnail_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> PrepareReport:
    """Prepare a cohort of slides into ``out_dir`` (one ``.h5ad`` per slide plus ``cohort.json``).

    Args:
        sources: Slides to prepare (`sources_from_her2st`, `sources_from_hest`, ...).
        out_dir: Output folder.
        encoder: Encoder registry name (`hist_st.encoders.get_encoder`).
        weights: Encoder weights file.
        patch_px, patch_um_per_px: Patch geometry (default 224 px at 0.5 um/px).
        stain_norm: None or ``"macenko"``.
        gene_mapping: Optional Ensembl id -> symbol mapping file.
        hvg_scope: ``"dataset"`` (all slides, as in the paper) or ``"train-only"`` (needs ``train_slides``);
            the all-slide ranking is always stored too (``hvg_dataset``).
        overwrite: Re-prepare slides that are already done.

    Returns:
        A `PrepareReport`.
    """
    import torch

    from hist_st.encoders import get_encoder
    from hist_st.harmonise import load_gene_mapping

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
    enc = get_encoder(encoder, weights, device)
    out.mkdir(parents=True, exist_ok=True)  # every option is valid: from here on the cohort folder exists
    report = PrepareReport(out)
    transform = macenko_normaliser(stain_reference) if stain_norm == "macenko" else None
    stain_tag = (
        None
        if stain_norm is None
        else f"{stain_norm}:{_file_sig(Path(stain_reference)) if stain_reference else 'default'}"
    )
    timings: dict[str, float] = {"threads": float(torch.get_num_threads())}

    todo = []
    for src in sources:
        if src.image is None and src.stored_patches is None:
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
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="slides", unit="slide")
    for src in todo:
        if bar is not None:
            bar.set_postfix_str(src.slide_id)
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
            )
            report.prepared.append(src.slide_id)
        except InputError as exc:
            report.failed[src.slide_id] = str(exc)
        except Exception as exc:  # report any failure of one slide; the others go on
            report.failed[src.slide_id] = f"{type(exc).__name__}: {exc}"
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    done = [s for s in sources if s.slide_id in set(report.prepared) | set(report.skipped_done)]
    if done:
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
    timings["total_s"] = time.perf_counter() - t_start
    report.timings = timings
    return report


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
        old_skipped = read_cohort_manifest(out).get("skipped", {})
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
                "n_patch_outside": int(np.asarray(s.patch_outside).sum())
                if s.patch_outside is not None
                else 0,
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
        "encoders": sorted(embedding_dims),
        "embedding_dims": embedding_dims,
        "technology": techs[0] if len(techs) == 1 else techs,
        "lattice_unit_um": units[0] if len(units) == 1 else units,
        "spot_pitch_um": pitches[0] if len(pitches) == 1 else pitches,
        "patch": params.as_dict(),
        "stain_norm": stain_norm,
        "skipped": skipped,
    }
    return write_cohort_manifest(out, manifest)
