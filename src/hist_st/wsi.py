"""Whole-slide and plain images: region reading and spot-centred patch extraction.

Four back ends share one interface (`SlideImage`):

- `TiffImage`: pyramidal TIFF / OME-TIFF / plain TIFF through tifffile, reading only the tiles (or strips)
  that a region touches, at the pyramid level the region needs (never the full-resolution image);
- `OpenSlideImage`: SVS, NDPI, MRXS and the other vendor formats through openslide-python;
- `PillowImage`: JPEG / PNG (and anything else Pillow decodes), decoded once into memory;
- `ArrayImage`: an RGB array already in memory, e.g. an image stored in an AnnData's ``uns['spatial']``
  (`open_image` reads ``"file.h5ad#uns/spatial/<library>/images/<key>"``).

`ScaledImage` presents a downscaled image (a Visium ``tissue_hires_image.png`` / ``tissue_lowres_image.png``,
whose scale factor 10x records in ``scalefactors_json.json``) in full-resolution pixel coordinates, so spot
positions in full-resolution pixels index it directly; `SlideImage.source_um_per_px` is then the real
resolution behind the pixels.

`extract_patches` / `iter_patch_batches` cut square patches centred on spot centres at a target
resolution (default 224 px at 0.5 um/px = 112 um), resampled from the slide's own um/px with an
antialiasing filter; a patch that reaches outside the image is padded with white and flagged.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hist_st.errors import InputError
from hist_st.slide import Slide

__all__ = [
    "SlideImage",
    "PillowImage",
    "ArrayImage",
    "ScaledImage",
    "TiffImage",
    "OpenSlideImage",
    "open_image",
    "PatchParams",
    "extract_patches",
    "iter_patch_batches",
    "patch_field_px",
    "as_rgb_uint8",
    "image_size",
    "upsampling_warning",
    "open_slide_image",
    "MAX_PATCH_UPSAMPLING",
    "PAD_VALUE",
]

PAD_VALUE = 255  # white: the colour of glass under brightfield illumination

TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".ome.tif", ".ome.tiff"}
OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"}


class SlideImage:
    """An RGB image that can read regions at several resolutions.

    Attributes:
        path: The image file.
        width, height: Full-resolution size in pixels.
        level_downsamples: Downsample factor of each pyramid level (level 0 = 1.0).
        um_per_px: Microns per full-resolution pixel recorded in the file, or None.
    """

    path: Path
    width: int
    height: int
    level_downsamples: list[float]
    um_per_px: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Read a region; pixels outside the image are `PAD_VALUE`.

        Args:
            x, y: Top-left corner in full-resolution (level 0) pixels.
            w, h: Size in pixels of ``level``.
            level: Pyramid level.

        Returns:
            uint8 ``[h, w, 3]`` RGB.
        """
        d = self.level_downsamples[level]
        return self.read_level(int(math.floor(x / d)), int(math.floor(y / d)), w, h, level)

    def read_level(self, lx: int, ly: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Like `read_region`, with the top-left corner ``(lx, ly)`` in pixels of ``level``."""
        raise NotImplementedError

    @property
    def source_um_per_px(self) -> float | None:
        """Microns per pixel of the finest pixels the file really holds (its level 0)."""
        if self.um_per_px is None:
            return None
        return float(self.um_per_px) * float(self.level_downsamples[0])

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (never upsample a level)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6) and d >= self.level_downsamples[best]:
                best = i
        return best

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """A small RGB overview whose longer side is at most ``max_size``.

        Returns:
            ``(thumb uint8 [h, w, 3], scale)`` with ``scale`` = thumbnail px per full-resolution px.
        """
        from PIL import Image

        # never larger than the pixels the file holds (a scaled copy's level 0 is coarser than full resolution)
        scale = min(1.0 / self.level_downsamples[0], max_size / max(self.width, self.height))
        level = self.best_level(1.0 / scale)
        d = self.level_downsamples[level]
        lw, lh = int(math.ceil(self.width / d)), int(math.ceil(self.height / d))
        region = self.read_level(0, 0, lw, lh, level)
        tw, th = max(1, round(self.width * scale)), max(1, round(self.height * scale))
        thumb = np.asarray(Image.fromarray(region).resize((tw, th), Image.Resampling.BOX))
        return thumb, tw / self.width

    def close(self) -> None:
        pass

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _paste(out: np.ndarray, src: np.ndarray, ox: int, oy: int) -> None:
    """Copy ``src`` into ``out`` at offset (ox, oy), clipping to ``out``."""
    h, w = out.shape[:2]
    x0, y0 = max(ox, 0), max(oy, 0)
    x1, y1 = min(ox + src.shape[1], w), min(oy + src.shape[0], h)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = src[y0 - oy : y1 - oy, x0 - ox : x1 - ox]


def _to_rgb(a: np.ndarray) -> np.ndarray:
    """Any [h, w] / [h, w, C] array to uint8 RGB [h, w, 3]."""
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.max(initial=0) > 255:
            a = (a.astype(np.float32) / (np.iinfo(a.dtype).max / 255.0)).round()
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 2:  # grey + alpha
        a = np.repeat(a[..., :1], 3, axis=2)
    elif a.shape[2] >= 4:
        a = a[..., :3]
    return a


class ArrayImage(SlideImage):
    """An RGB image held in memory as a uint8 ``[h, w, 3]`` array (one level)."""

    def __init__(self, array: np.ndarray, path: str | Path, um_per_px: float | None = None) -> None:
        self.path = Path(path)
        self._arr = _to_rgb(np.asarray(array))
        self.height, self.width = self._arr.shape[:2]
        self.level_downsamples = [1.0]
        self.um_per_px = um_per_px

    @property
    def array(self) -> np.ndarray:
        return self._arr

    def read_level(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        out = np.full((h, w, 3), PAD_VALUE, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._arr[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._arr = np.zeros((0, 0, 3), np.uint8)


class PillowImage(ArrayImage):
    """A JPEG/PNG/... image decoded once into memory (these formats have no random tile access)."""

    def __init__(self, path: str | Path, um_per_px: float | None = None) -> None:
        from PIL import Image

        path = Path(path)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # histology images are legitimately huge
        try:
            with Image.open(path) as im:
                im.load()
                dpi = im.info.get("dpi")
                arr = np.asarray(im.convert("RGB") if im.mode not in ("RGB",) else im)
        except Exception as exc:
            raise InputError(path, f"cannot decode the image ({type(exc).__name__}: {exc}); is it truncated?") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = old
        super().__init__(arr, path, um_per_px)
        if self.um_per_px is None and dpi and dpi[0] and float(dpi[0]) > 1000:  # a real scan, not 72/96 dpi
            self.um_per_px = 25400.0 / float(dpi[0])


H5AD_IMAGE_SEP = "#"


def read_h5ad_image(ref: str | Path) -> np.ndarray:
    """Read an image stored inside an ``.h5ad`` file: ``"file.h5ad#uns/spatial/<lib>/images/<key>"``.

    Returns:
        uint8 ``[h, w, 3]`` RGB (float images in [0, 1], as scanpy stores them, are scaled to 0-255).
    """
    import h5py

    path, _, key = str(ref).partition(H5AD_IMAGE_SEP)
    try:
        with h5py.File(path, "r") as f:
            arr = np.asarray(f[key][()])
    except Exception as exc:
        raise InputError(path, f"cannot read the image {key!r} ({type(exc).__name__}: {exc})") from exc
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 2:
        raise InputError(path, f"{key!r} is not an image (shape {arr.shape})")
    return as_rgb_uint8(arr)


def as_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Any image array (uint8/uint16, or float in [0, 1] as scanpy stores them) as uint8 RGB ``[h, w, 3]``."""
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float32))
        arr = np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    return _to_rgb(arr)


class ScaledImage(SlideImage):
    """A downscaled image presented in full-resolution pixel coordinates.

    Args:
        inner: The image file's own `SlideImage` (e.g. a Visium lowres PNG).
        scale: Image pixels per full-resolution pixel (10x ``tissue_lowres_scalef`` / ``tissue_hires_scalef``).
        um_per_px: Microns per full-resolution pixel (the frame the spot positions use).

    ``width``/``height`` are the full-resolution extent the image covers; its level ``i`` has downsample
    ``inner.level_downsamples[i] / scale``, so `extract_patches` reads it like a pyramid level coarser than
    the patch (and enlarges: `source_um_per_px` says by how much).
    """

    def __init__(self, inner: SlideImage, scale: float, um_per_px: float | None = None) -> None:
        if not (np.isfinite(scale) and scale > 0):
            raise InputError(inner.path, f"invalid image scale factor {scale!r}")
        self.inner = inner
        self.scale = float(scale)
        self.path = inner.path
        self.width = max(1, int(round(inner.width / self.scale)))
        self.height = max(1, int(round(inner.height / self.scale)))
        self.level_downsamples = [d / self.scale for d in inner.level_downsamples]
        self.um_per_px = um_per_px

    def read_level(self, lx: int, ly: int, w: int, h: int, level: int = 0) -> np.ndarray:
        return self.inner.read_level(lx, ly, w, h, level)

    def close(self) -> None:
        self.inner.close()


def _tiff_um_per_px(tif, page) -> float | None:
    """Microns per pixel from OME-XML, an Aperio description or the TIFF resolution tags."""
    try:
        if tif.is_ome and tif.ome_metadata:
            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            if m:
                v = float(m.group(1))
                unit = u.group(1) if u else "µm"
                factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit, 1.0)
                return v * factor
        desc = page.description or ""
        m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
        if m:
            return float(m.group(1))
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            if num and den:
                px_per_unit = num / den
                if unit == 3:  # centimetre
                    return 1e4 / px_per_unit
                if unit == 2 and px_per_unit > 1000:  # inch; 72/96/300 dpi are screen defaults, not scans
                    return 25400.0 / px_per_unit
    except Exception:
        return None
    return None


class TiffImage(SlideImage):
    """A (pyramidal) TIFF read tile by tile with tifffile; decoded tiles are kept in a small LRU cache."""

    def __init__(self, path: str | Path, um_per_px: float | None = None, cache_tiles: int = 256) -> None:
        import tifffile

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            levels = list(series.levels)
        except Exception as exc:
            raise InputError(self.path, f"cannot read as a TIFF ({type(exc).__name__}: {exc})") from exc
        self._pages = []
        for lev in levels:
            page = lev.keyframe if hasattr(lev, "keyframe") else lev.pages[0]
            self._pages.append(page)
        p0 = self._pages[0]
        self.height, self.width = int(p0.imagelength), int(p0.imagewidth)
        self.level_downsamples = [self.width / int(p.imagewidth) for p in self._pages]
        self.um_per_px = um_per_px if um_per_px is not None else _tiff_um_per_px(self._tif, p0)
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_tiles
        self._lock = threading.Lock()

    def close(self) -> None:
        self._tif.close()

    def _segment(self, page, index: int) -> tuple[np.ndarray, int, int]:
        """Decode segment ``index`` of ``page``: returns (rgb [h, w, 3], top, left)."""
        key = (id(page), index)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            fh = self._tif.filehandle
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            if count == 0:
                raise InputError(self.path, f"tile {index} is empty (truncated file?)")
            fh.seek(offset)
            data = fh.read(count)
            if len(data) != count:
                raise InputError(self.path, f"tile {index} is truncated ({len(data)} of {count} bytes)")
        try:
            seg, idx, _shape = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:
            raise InputError(self.path, f"cannot decode tile {index} ({type(exc).__name__}: {exc})") from exc
        if seg is None:
            raise InputError(self.path, f"cannot decode tile {index}")
        seg = np.asarray(seg)
        seg = seg.reshape(seg.shape[-3:]) if seg.ndim > 3 else seg
        hit = (_to_rgb(seg), int(idx[2]), int(idx[3]))
        with self._lock:
            self._cache[key] = hit
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return hit

    def read_level(self, lx: int, ly: int, w: int, h: int, level: int = 0) -> np.ndarray:
        page = self._pages[level]
        out = np.full((h, w, 3), PAD_VALUE, dtype=np.uint8)
        pw, ph = int(page.imagewidth), int(page.imagelength)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, pw), min(ly + h, ph)
        if x1 <= x0 or y1 <= y0:
            return out
        if page.planarconfig != 1 and page.samplesperpixel > 1:
            if pw * ph > 50_000_000:
                raise InputError(
                    self.path, "planar-separate TIFF levels larger than 50 Mpx are not supported"
                )
            arr = np.moveaxis(page.asarray(), 0, -1)
            _paste(out, _to_rgb(arr[y0:y1, x0:x1]), x0 - lx, y0 - ly)
            return out
        if page.is_tiled:
            tw, th = int(page.tilewidth), int(page.tilelength)
            ntx = (pw + tw - 1) // tw
            indices = [
                ty * ntx + tx
                for ty in range(y0 // th, (y1 - 1) // th + 1)
                for tx in range(x0 // tw, (x1 - 1) // tw + 1)
            ]
        else:
            rps = int(page.rowsperstrip) if page.rowsperstrip else ph
            rps = min(rps, ph)
            indices = list(range(y0 // rps, (y1 - 1) // rps + 1))
        for index in indices:
            seg, top, left = self._segment(page, index)
            seg = seg[: ph - top, : pw - left]  # edge tiles are padded beyond the image: drop that part
            _paste(out, seg, left - lx, top - ly)
        return out


class OpenSlideImage(SlideImage):
    """A vendor whole-slide image (SVS, NDPI, MRXS, ...) read through openslide."""

    def __init__(self, path: str | Path, um_per_px: float | None = None) -> None:
        import openslide

        self.path = Path(path)
        try:
            self._os = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            raise InputError(
                self.path, f"openslide cannot open the slide ({type(exc).__name__}: {exc})"
            ) from exc
        self.width, self.height = self._os.dimensions
        self.level_downsamples = [float(d) for d in self._os.level_downsamples]
        mpp = self._os.properties.get("openslide.mpp-x")
        self.um_per_px = um_per_px if um_per_px is not None else (float(mpp) if mpp else None)

    def read_level(self, lx: int, ly: int, w: int, h: int, level: int = 0) -> np.ndarray:
        d = self.level_downsamples[level]
        try:
            rgba = np.asarray(self._os.read_region((round(lx * d), round(ly * d)), level, (int(w), int(h))))
        except Exception as exc:
            raise InputError(self.path, f"cannot read region ({type(exc).__name__}: {exc})") from exc
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + PAD_VALUE * (1 - alpha)
        return rgb.round().astype(np.uint8)

    def close(self) -> None:
        self._os.close()


def open_image(path: str | Path, um_per_px: float | None = None, *, scale: float | None = None) -> SlideImage:
    """Open ``path`` with the right back end (by suffix, then by content for TIFF-like files).

    Args:
        path: Image file, or ``"file.h5ad#uns/spatial/<lib>/images/<key>"`` for an image inside an AnnData.
        um_per_px: Microns per full-resolution pixel; overrides the resolution recorded in the file.
        scale: Image pixels per full-resolution pixel when the file is a downscaled copy (Visium
            hires/lowres); the returned image then works in full-resolution coordinates (`ScaledImage`).

    Raises:
        InputError: The file is missing, unreadable or truncated.
    """
    if scale is not None and abs(float(scale) - 1.0) > 1e-9:
        inner = open_image(path)
        return ScaledImage(inner, float(scale), um_per_px)
    if H5AD_IMAGE_SEP in str(path) and str(path).split(H5AD_IMAGE_SEP)[0].endswith(".h5ad"):
        return ArrayImage(read_h5ad_image(path), str(path), um_per_px)
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "image file not found")
    name = path.name.lower()
    suffix = path.suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES:
        return OpenSlideImage(path, um_per_px)
    if suffix in (".tif", ".tiff", ".btf") or name.endswith((".ome.tif", ".ome.tiff")):
        img = TiffImage(path, um_per_px)
        return img
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return TiffImage(path, um_per_px)
    return PillowImage(path, um_per_px)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, reading only its header where the format allows."""
    from PIL import Image

    if H5AD_IMAGE_SEP not in str(path) and Path(path).suffix.lower() not in OPENSLIDE_SUFFIXES:
        try:
            with Image.open(path) as im:  # lazy: the header, not the pixels
                return int(im.size[0]), int(im.size[1])
        except Exception:  # noqa: BLE001 - not a Pillow format: the back end reads its header
            pass
    with open_image(path) as img:
        return int(img.width), int(img.height)


class PatchParams:
    """Patch geometry: ``size_px`` pixels at ``um_per_px`` microns per pixel (default 224 px at 0.5 um/px)."""

    def __init__(self, size_px: int = 224, um_per_px: float = 0.5) -> None:
        if size_px <= 0 or um_per_px <= 0:
            raise ValueError("patch size and resolution must be positive")
        self.size_px = int(size_px)
        self.um_per_px = float(um_per_px)

    @property
    def field_um(self) -> float:
        return self.size_px * self.um_per_px

    def as_dict(self) -> dict:
        return {"size_px": self.size_px, "um_per_px": self.um_per_px}

    def __repr__(self) -> str:
        return f"PatchParams(size_px={self.size_px}, um_per_px={self.um_per_px})"


#: Patches enlarged more than this from the image's real pixels are flagged (they hold no finer detail).
MAX_PATCH_UPSAMPLING = 2.0


def upsampling_warning(source_um_per_px: float, patch_um_per_px: float, image: str = "the image") -> str | None:
    """A warning when patches at ``patch_um_per_px`` are enlarged > `MAX_PATCH_UPSAMPLING` from the image's pixels."""
    up = float(source_um_per_px) / float(patch_um_per_px)
    if up <= MAX_PATCH_UPSAMPLING:
        return None
    return (
        f"patches are enlarged {up:.1f}x: {image} has {source_um_per_px:.2f} um/px but patches are cut at "
        f"{patch_um_per_px:g} um/px; they hold no detail finer than {source_um_per_px:.1f} um, so embeddings and "
        "predictions are coarse. Use the full-resolution image when you have it."
    )


def open_slide_image(
    slide: Slide,
    params: PatchParams,
    warnings: list[str],
    *,
    thumbnail_size: int | None = 1024,
    timings: dict | None = None,
    um_hint: str = "pass --um-per-px",
) -> SlideImage:
    """Open ``slide.image`` for cutting patches, checking it against the slide (``slide`` updated in place).

    The path is made absolute; ``slide.um_per_px`` comes from the image file when the slide has none; every
    spot centre must lie inside the image; the real resolution behind the patches is recorded in
    ``slide.meta`` (``image_scale``, ``source_um_per_px``, ``patch_upsampling``) and a warning appended to
    ``warnings`` when patches are enlarged > 2x from it; a thumbnail is stored unless the slide keeps its
    original images (Visium hires/lowres) or ``thumbnail_size`` is None.

    Args:
        slide: A slide with ``image`` set (``image_scale`` for a downscaled copy).
        params: The patch geometry.
        warnings: Receives the slide's warnings.
        thumbnail_size: Longest side of the thumbnail in pixels (None: no thumbnail).
        timings: Accumulates ``thumbnail_s``.
        um_hint: How the caller can give um per pixel, for the error when none is known.

    Returns:
        The open image (the caller closes it) in full-resolution pixel coordinates.

    Raises:
        InputError: No um per pixel known, or spot centres outside the image (naming the first ones).
    """
    timings = timings if timings is not None else {}
    if H5AD_IMAGE_SEP not in slide.image:
        slide.image = str(Path(slide.image).resolve())
    image = open_image(slide.image, scale=slide.image_scale)
    try:
        if slide.um_per_px is None:
            slide.um_per_px = _recorded_um_per_px(image)
            slide.meta["um_per_px_source"] = "recorded in the image file"
        if slide.um_per_px is None:
            raise InputError(slide.image, f"no um per pixel in the image or the slide metadata; {um_hint}")
        image.um_per_px = slide.um_per_px
        _check_spots_inside(slide, image)
        warning = _record_image_resolution(slide, image, params)
        if warning:
            warnings.append(warning)
        if thumbnail_size is not None and not slide.spatial_images:  # Visium keeps its hires/lowres images
            t0 = time.perf_counter()
            slide.thumbnail, slide.thumbnail_scale = image.thumbnail(thumbnail_size)
            timings["thumbnail_s"] = timings.get("thumbnail_s", 0.0) + time.perf_counter() - t0
    except BaseException:
        image.close()
        raise
    return image


def _recorded_um_per_px(image: SlideImage) -> float | None:
    """Full-resolution um/px recorded in the file (a scaled copy's own um/px times its scale)."""
    inner = getattr(image, "inner", None)
    if inner is not None:
        return inner.um_per_px * image.scale if inner.um_per_px else None
    return image.um_per_px


def _record_image_resolution(slide: Slide, image: SlideImage, params: PatchParams) -> str | None:
    """Record the real resolution behind the patches in ``slide.meta``; a warning when enlarged > 2x from it."""
    source = float(image.source_um_per_px)
    slide.meta.update(
        image_scale=float(slide.image_scale or 1.0),
        source_um_per_px=source,
        patch_upsampling=source / params.um_per_px,
    )
    what = f"the image ({Path(str(image.path)).name}, scale {slide.image_scale or 1.0:g} of full resolution)"
    return upsampling_warning(source, params.um_per_px, what)


def _check_spots_inside(slide: Slide, image: SlideImage) -> None:
    """Every spot centre must lie inside the image (in full-resolution pixels); name the ones that do not.

    Raises:
        InputError: Some spot centres lie outside (with a hint: wrong image or scale, or a cropped image).
    """
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


def patch_field_px(slide_um_per_px: float, params: PatchParams) -> float:
    """Side of a patch's field of view in full-resolution pixels."""
    return params.field_um / slide_um_per_px


def _one_patch(image: SlideImage, cx: float, cy: float, fov: float, size: int) -> tuple[np.ndarray, bool]:
    from PIL import Image

    x0f, y0f = cx - fov / 2.0, cy - fov / 2.0
    outside = x0f < 0 or y0f < 0 or x0f + fov > image.width or y0f + fov > image.height
    level = image.best_level(fov / size)
    d = image.level_downsamples[level]
    # Integer window at ``level`` covering the field of view plus a 2-px margin for the resampling filter.
    lx0, ly0 = math.floor(x0f / d) - 2, math.floor(y0f / d) - 2
    lx1, ly1 = math.ceil((x0f + fov) / d) + 2, math.ceil((y0f + fov) / d) + 2
    region = image.read_level(lx0, ly0, lx1 - lx0, ly1 - ly0, level)
    box = (x0f / d - lx0, y0f / d - ly0, (x0f + fov) / d - lx0, (y0f + fov) / d - ly0)
    pil = Image.fromarray(region)
    patch = pil.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    return np.asarray(patch), outside


def iter_patch_batches(
    image: SlideImage,
    centers: np.ndarray,
    slide_um_per_px: float,
    params: PatchParams | None = None,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "patches",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield spot-centred patches in batches.

    Args:
        image: An open `SlideImage`.
        centers: Spot centres ``[N, 2]`` (x, y) in full-resolution pixels.
        slide_um_per_px: Microns per full-resolution pixel of ``image``.
        params: Target patch geometry.
        batch_size: Patches per yielded batch.

    Yields:
        ``(patches uint8 [B, P, P, 3], outside bool [B])`` in the order of ``centers``.
    """
    params = params or PatchParams()
    if slide_um_per_px is None or not np.isfinite(slide_um_per_px) or slide_um_per_px <= 0:
        raise InputError(image.path, f"invalid um per pixel {slide_um_per_px!r}")
    centers = np.asarray(centers, dtype=np.float64)
    fov = patch_field_px(slide_um_per_px, params)
    n = len(centers)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, unit="patch", leave=False)
    for start in range(0, n, batch_size):
        chunk = centers[start : start + batch_size]
        out = np.empty((len(chunk), params.size_px, params.size_px, 3), dtype=np.uint8)
        outside = np.zeros(len(chunk), dtype=bool)
        for i, (cx, cy) in enumerate(chunk):
            out[i], outside[i] = _one_patch(image, cx, cy, fov, params.size_px)
        if bar is not None:
            bar.update(len(chunk))
        yield out, outside
    if bar is not None:
        bar.close()


def extract_patches(
    image: SlideImage | str | Path,
    centers: np.ndarray,
    slide_um_per_px: float | None = None,
    params: PatchParams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Extract all patches at once (small slides, tests); see `iter_patch_batches`.

    Returns:
        ``(patches uint8 [N, P, P, 3], outside bool [N])``.
    """
    own = not isinstance(image, SlideImage)
    img = open_image(image) if own else image
    try:
        upp = slide_um_per_px if slide_um_per_px is not None else img.um_per_px
        if upp is None:
            raise InputError(img.path, "the image records no um per pixel; pass slide_um_per_px")
        batches = list(iter_patch_batches(img, centers, upp, params, batch_size=max(1, len(centers))))
    finally:
        if own:
            img.close()
    if not batches:
        p = (params or PatchParams()).size_px
        return np.zeros((0, p, p, 3), np.uint8), np.zeros(0, bool)
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
