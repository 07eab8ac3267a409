"""Turn patches into embeddings: the encoding loop of `hist-st prepare` and its per-slide cache files.

Patches are cut (or read from a HEST patch file), decoded and stain-normalised on a background thread
while the encoder works on the previous batch (`embed_batches`), so JPEG decoding and cropping leave the
encoder's critical path. The cache key is composed by `hist_st.prepared` (it knows the slide's sources);
this module reads and writes the cache files (`embed_slide_cached`).

```python
from hist_st.embed import embed_batches, embed_slide
emb, outside = embed_batches(encoder, batches)            # batches: (uint8 [B, H, W, 3], bool [B]) pairs
emb, outside = embed_slide(slide, image, encoder, params)  # every spot of a slide
embed_he_slide(slide, encoder="efficientnet-lite0")       # a slide with an image, in place
```
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from hist_st.encoders import get_encoder
from hist_st.errors import InputError
from hist_st.slide import Slide, atomic_write
from hist_st.stain import macenko_normaliser
from hist_st.wsi import PatchParams, SlideImage, iter_patch_batches, open_image

__all__ = ["embed_batches", "embed_slide", "embed_slide_cached", "embed_he_slide", "read_stored_patches", "load_cache", "save_cache", "prefetch"]

Batch = tuple[np.ndarray, np.ndarray]


def prefetch(items: Iterable[Batch], depth: int = 2, transform: Callable[[np.ndarray], np.ndarray] | None = None,
             timings: dict | None = None) -> Iterator[Batch]:
    """Iterate ``items`` on a background thread, up to ``depth`` batches ahead of the consumer.

    Args:
        items: ``(patches uint8 [B, H, W, 3], outside bool [B])`` pairs (e.g. `iter_patch_batches`).
        depth: Batches read ahead; 0 reads on the caller's thread.
        transform: Applied to each patch batch on the same thread (stain normalisation).
        timings: ``extract_s`` accumulates the producing thread's seconds.

    Yields:
        The pairs, in order. An exception of the producer is raised here.
    """
    timings = timings if timings is not None else {}

    def produce() -> Iterator[Batch]:
        it = iter(items)
        while True:
            t0 = time.perf_counter()
            try:
                b, out = next(it)
            except StopIteration:
                return
            if transform is not None:
                b = transform(b)
            timings["extract_s"] = timings.get("extract_s", 0.0) + time.perf_counter() - t0
            yield b, out

    if depth <= 0:
        yield from produce()
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for item in produce():
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(exc)

    thread = threading.Thread(target=worker, name="hist-st-patches", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def embed_batches(
    encoder,
    batches: Iterable[Batch],
    *,
    n: int | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    prefetch_depth: int = 2,
    timings: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode patch batches, reading the next ones on a background thread meanwhile.

    Args:
        encoder: A `hist_st.encoders.Encoder`.
        batches: ``(patches uint8 [B, H, W, 3], outside bool [B])`` pairs.
        n: Total patches when known (the output is allocated once); None collects and concatenates.
        transform: Patch transform (e.g. Macenko stain normalisation), run on the reading thread.
        prefetch_depth: Batches read ahead (0: read on this thread).
        timings: Accumulates ``extract_s`` (reading thread), ``encode_s`` and ``patches``.
        on_batch: Called with each batch's size (progress bars).

    Returns:
        ``(embeddings float32 [N, C], patch_outside bool [N])``.
    """
    timings = timings if timings is not None else {}
    embs: list[np.ndarray] = []
    outs: list[np.ndarray] = []
    emb = np.empty((n, encoder.dim), dtype=np.float32) if n is not None else None
    outside = np.zeros(n, dtype=bool) if n is not None else None
    start = 0
    for b, out in prefetch(batches, prefetch_depth, transform, timings):
        t1 = time.perf_counter()
        e = encoder.encode(b)
        timings["encode_s"] = timings.get("encode_s", 0.0) + time.perf_counter() - t1
        timings["patches"] = timings.get("patches", 0.0) + len(b)
        if emb is not None:
            if start + len(b) > len(emb):
                raise ValueError(f"embed_batches: more than n={n} patches")
            emb[start : start + len(b)] = e
            outside[start : start + len(b)] = out
        else:
            embs.append(np.asarray(e, dtype=np.float32))
            outs.append(np.asarray(out, dtype=bool))
        start += len(b)
        if on_batch is not None:
            on_batch(len(b))
    if emb is None:
        emb = np.concatenate(embs) if embs else np.zeros((0, encoder.dim), np.float32)
        outside = np.concatenate(outs) if outs else np.zeros(0, bool)
    elif start != len(emb):
        raise ValueError(f"embed_batches: {start} patches, n={n} expected")
    return emb, outside


def read_stored_patches(path: Path, barcodes: np.ndarray) -> np.ndarray:
    """Patches ``uint8 [N, H, W, 3]`` of ``barcodes``, in that order, from a HEST patch file."""
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
    prefetch_depth: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed every spot of ``slide``: patches from ``stored_patches`` (HEST) or cut from ``image``.

    Returns:
        ``(embeddings float32 [N, C], patch_outside bool [N])``.

    Raises:
        InputError: No image to cut patches from, or the encoder produced non-finite values.
    """
    timings = timings if timings is not None else {}
    n = slide.n_spots
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"{slide.slide_id} patches", unit="patch", leave=False)
    if stored_patches is not None:
        t0 = time.perf_counter()
        patches = read_stored_patches(stored_patches, slide.barcodes)
        if patches.shape[1] != params.size_px:
            from PIL import Image

            patches = np.stack(
                [
                    np.asarray(Image.fromarray(p).resize((params.size_px,) * 2, Image.Resampling.BILINEAR))
                    for p in patches
                ]
            )
        timings["extract_s"] = timings.get("extract_s", 0.0) + time.perf_counter() - t0
        batches: Iterable[Batch] = (
            (patches[i : i + batch_size], np.zeros(len(patches[i : i + batch_size]), bool))
            for i in range(0, n, batch_size)
        )
    else:
        if image is None:
            raise InputError(f"slide {slide.slide_id!r}", "no image to cut patches from")
        batches = iter_patch_batches(image, slide.spatial, slide.um_per_px, params, batch_size=batch_size)
    try:
        emb, outside = embed_batches(encoder, batches, n=n, transform=transform, prefetch_depth=prefetch_depth,
                                     timings=timings, on_batch=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if not np.all(np.isfinite(emb)):
        raise InputError(f"slide {slide.slide_id!r}", "the encoder produced NaN/inf embeddings")
    return emb, outside


def save_cache(path: Path, emb: np.ndarray, outside: np.ndarray) -> None:
    """Write a slide's embeddings ``[N, C]`` and patch-outside flags ``[N]`` atomically (``.npz``)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, emb=emb, outside=outside)


def load_cache(path: Path, n_spots: int, timings: dict) -> tuple[np.ndarray, np.ndarray] | None:
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


def embed_slide_cached(
    cache: Path,
    slide: Slide,
    image: SlideImage | None,
    encoder,
    params: PatchParams,
    *,
    timings: dict | None = None,
    **options,
) -> tuple[np.ndarray, np.ndarray]:
    """`embed_slide` through the cache file ``cache``: read it when it holds this slide, else embed and write it.

    Args:
        cache: The slide's cache file (`hist_st.prepared.embedding_cache_path`).
        slide, image, encoder, params: As for `embed_slide`.
        timings: Also counts ``cached_slides`` (and ``cache_rebuilt`` for a damaged file).
        **options: `embed_slide`'s keyword options (``batch_size``, ``transform``, ``stored_patches``, ...).

    Returns:
        ``(embeddings float32 [N, C], patch_outside bool [N])``.
    """
    timings = timings if timings is not None else {}
    cached = load_cache(cache, slide.n_spots, timings)
    if cached is not None:
        timings["cached_slides"] = timings.get("cached_slides", 0) + 1
        return cached
    emb, outside = embed_slide(slide, image, encoder, params, timings=timings, **options)
    save_cache(cache, emb, outside)
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
