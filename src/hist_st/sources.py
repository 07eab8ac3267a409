"""The slides a ``hist-st prepare`` call reads: one `SlideSource` per input, whatever the format.

```python
from hist_st.sources import find_sources
sources = find_sources("spaceranger", ["s1/outs", "s2/outs"], images=["s1.tif", "s2.tif"])
sources = find_sources("her2st", ["data/her2st"], sections=["A1", "B1"])
```
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hist_st.errors import InputError
from hist_st.io.anndata_reader import read_anndata
from hist_st.io.hest import find_hest_samples, read_hest
from hist_st.io.legacy_st import find_her2st_sections, read_her2st_section
from hist_st.io.spaceranger import read_spaceranger
from hist_st.slide import Slide

__all__ = [
    "FORMATS",
    "SlideSource",
    "find_sources",
    "sources_from_her2st",
    "sources_from_hest",
    "source_from_spaceranger",
    "source_from_anndata",
    "sources_from_table",
    "file_signature",
    "short_hash",
]

FORMATS = ("her2st", "hest", "spaceranger", "anndata")


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
        image_in_source: The reader may find an image itself when ``image`` is None (Space Ranger
            ``spatial/`` images, AnnData ``uns['spatial']`` images).
    """

    slide_id: str
    load: Callable[[], Slide]
    image: Path | None
    patient: str | None = None
    stored_patches: Path | None = None
    fingerprint: str = ""
    image_in_source: bool = False


def file_signature(path: Path | None) -> str:
    """Path, size and mtime of a file (``"none"`` for None, ``"<path>:missing"``): changes when it does."""
    if path is None:
        return "none"
    try:
        st = Path(path).stat()
        return f"{Path(path).resolve()}:{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        return f"{path}:missing"


def short_hash(*parts: object) -> str:
    """A 16-hex-digit SHA-1 of the ``repr`` of ``parts``: cache keys and input fingerprints."""
    h = hashlib.sha1()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def sources_from_her2st(
    root: str | Path, sections: Sequence[str] | None = None, um_per_px: float | None = None
) -> list[SlideSource]:
    """One source per section of a her2st-layout folder (``sections`` restricts the ids).

    ``um_per_px`` overrides the resolution derived from the spot spacing (200 um pitch).
    """
    out = []
    for sec in find_her2st_sections(root):
        if sections and sec.slide_id not in sections:
            continue
        out.append(
            SlideSource(
                sec.slide_id,
                (lambda s=sec: read_her2st_section(s, um_per_px=um_per_px)),
                sec.image,
                sec.patient,
                fingerprint=short_hash(file_signature(sec.counts), file_signature(sec.spots), file_signature(sec.image), um_per_px),
            )
        )
    if sections:
        unknown = set(sections) - {s.slide_id for s in out}
        if unknown:
            raise InputError(root, f"sections not found: {sorted(unknown)}")
    return out


def sources_from_hest(root: str | Path, ids: Sequence[str] | None = None) -> list[SlideSource]:
    """One source per HEST-1k sample under ``root`` (``st/<id>.h5ad``)."""
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
                fingerprint=short_hash(
                    file_signature(s.st), file_signature(s.wsi), file_signature(s.patches), file_signature(s.metadata)
                ),
            )
        )
    return out


def source_from_spaceranger(
    outs: str | Path,
    image: str | Path | None,
    slide_id: str | None = None,
    patient: str | None = None,
    um_per_px: float | None = None,
    image_scale: float | None = None,
) -> SlideSource:
    """A Space Ranger ``outs/`` folder plus its image (full resolution, hires or lowres; None: the folder's own).

    See `hist_st.io.spaceranger.read_spaceranger` for how the image and its scale are chosen.
    """
    outs = Path(outs)
    sid = slide_id or (outs.parent.name if outs.name == "outs" else outs.name)
    img = Path(image) if image else None
    spatial = outs / "spatial"
    sigs = [file_signature(p) for p in sorted(spatial.glob("*"))] if spatial.is_dir() else []
    return SlideSource(
        sid,
        lambda: read_spaceranger(
            outs, img, slide_id=sid, patient=patient, um_per_px=um_per_px, image_scale=image_scale
        ),
        img,
        patient,
        fingerprint=short_hash(file_signature(outs), file_signature(img), sigs, um_per_px, image_scale),
        image_in_source=True,
    )


def source_from_anndata(
    path: str | Path,
    image: str | Path | None,
    slide_id: str | None = None,
    patient: str | None = None,
    um_per_px: float | None = None,
    spot_pitch_um: float | None = None,
    technology: str | None = None,
    image_scale: float | None = None,
) -> SlideSource:
    """Any AnnData ``.h5ad`` with ``obsm['spatial']`` plus an image (None: the images in ``uns['spatial']``)."""
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
            image_scale=image_scale,
        ),
        img,
        patient,
        fingerprint=short_hash(file_signature(path), file_signature(img), um_per_px, spot_pitch_um, image_scale),
        image_in_source=True,
    )


def sources_from_table(table: str | Path, fmt: str) -> list[SlideSource]:
    """Sources from a CSV/TSV with columns ``path`` and optional ``image, slide_id, patient, um_per_px,
    image_scale``."""
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
        try:
            upp = float(row["um_per_px"]) if row.get("um_per_px") else None
            scale = float(row["image_scale"]) if row.get("image_scale") else None
        except ValueError as exc:
            raise InputError(table, f"row {sid or row['path']!r}: um_per_px/image_scale must be numbers ({exc})") from exc
        if fmt == "spaceranger":
            out.append(source_from_spaceranger(path, image, sid, patient, upp, scale))
        elif fmt == "anndata":
            out.append(source_from_anndata(path, image, sid, patient, upp, image_scale=scale))
        else:
            raise InputError(table, f"sample tables are for spaceranger/anndata inputs, not {fmt!r}")
    return out


def _per_input(values: Sequence[Any] | None, n: int, option: str) -> list[Any]:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise InputError(option, f"give one value per --input ({n}), got {len(values)}")
    return list(values)


def find_sources(
    format: str,
    inputs: Sequence[str | Path],
    *,
    images: Sequence[str | Path] | None = None,
    image_scales: Sequence[float] | None = None,
    slide_ids: Sequence[str] | None = None,
    patients: Sequence[str] | None = None,
    um_per_px: float | None = None,
    sections: Sequence[str] | None = None,
) -> list[SlideSource]:
    """The slides to prepare.

    Args:
        format: ``her2st``, ``hest`` (one folder each, ``sections`` picks its slides), ``spaceranger`` or
            ``anndata`` (one input per slide, or one CSV/TSV sample table).
        inputs: Input folders or files.
        images, image_scales, slide_ids, patients: One per input (``spaceranger`` / ``anndata``).
        um_per_px: Microns per full-resolution pixel (not for HEST-1k, which records its own).
        sections: her2st section ids / HEST sample ids to include (default: all).

    Returns:
        One `SlideSource` per slide.

    Raises:
        InputError: An option the format does not use, a count that does not match the inputs, a bad
            resolution; naming the command-line option.
    """
    given = {"--image": images, "--image-scale": image_scales, "--slide-id": slide_ids, "--patient": patients}
    if um_per_px is not None and not (0 < um_per_px < float("inf")):
        raise InputError("--um-per-px", f"must be a positive number, got {um_per_px}")
    if format in ("her2st", "hest"):
        for flag, value in given.items():
            if value is not None:
                raise InputError(flag, f"is not used by --format {format} (the folder names its images and ids)")
        if len(inputs) != 1:
            raise InputError("--input", f"give one {'her2st' if format == 'her2st' else 'HEST-1k'} folder")
        if format == "her2st":
            return sources_from_her2st(inputs[0], sections, um_per_px=um_per_px)
        if um_per_px is not None:
            raise InputError(
                "--um-per-px", "HEST-1k records each sample's resolution (pixel_size_um_estimated); it is not overridden"
            )
        return sources_from_hest(inputs[0], sections)
    if format not in FORMATS:
        raise InputError("--format", f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if len(inputs) == 1 and Path(inputs[0]).suffix.lower() in (".csv", ".tsv", ".txt"):
        for flag, value in {**given, "--um-per-px": um_per_px}.items():
            if value is not None:
                raise InputError(flag, f"give it as a column of the sample table {inputs[0]}, not on the command line")
        return sources_from_table(inputs[0], format)
    n = len(inputs)
    rows = zip(inputs, _per_input(images, n, "--image"), _per_input(slide_ids, n, "--slide-id"),
               _per_input(patients, n, "--patient"), _per_input(image_scales, n, "--image-scale"))
    if format == "spaceranger":
        return [source_from_spaceranger(i, im, s, pt, um_per_px, sc) for i, im, s, pt, sc in rows]
    return [source_from_anndata(i, im, s, pt, um_per_px, image_scale=sc) for i, im, s, pt, sc in rows]
