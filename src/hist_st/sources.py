"""The slides a ``hist-st prepare`` call reads: one `SlideSource` per input, whatever the format.

```python
from hist_st.sources import find_sources
sources = find_sources("spaceranger", ["s1/outs", "s2/outs"], images=["s1.tif", "s2.tif"])
sources = find_sources("her2st", ["data/her2st"], sections=["A1", "B1"])
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hist_st.errors import InputError
from hist_st.prepare import (
    SlideSource,
    source_from_anndata,
    source_from_spaceranger,
    sources_from_her2st,
    sources_from_hest,
    sources_from_table,
)

__all__ = ["FORMATS", "find_sources"]

FORMATS = ("her2st", "hest", "spaceranger", "anndata")


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
