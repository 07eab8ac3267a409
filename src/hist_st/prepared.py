"""What makes a prepared slide "the same": its keys, its embedding cache file, and the files `prepare` skips.

A prepared slide ``<out>/<slide_id>.h5ad`` records ``meta['prepare_key']`` (`prepared_key`): the inputs'
fingerprint, the encoder, the patch geometry, the stain normalisation and the versions of the prepared
format and of its lattice geometry. A re-run skips a slide whose recorded key (`existing_key`) matches.
Embeddings are cached per slide in ``<out>/.hist_st_cache/<slide_id>/<encoder>-<key>.npz``
(`embedding_cache_path`; the files themselves are read and written by `hist_st.embed`), keyed without the
lattice version so that a new lattice geometry reuses them.

```python
from hist_st.prepared import embedding_cache_path, existing_key, prepared_key
if existing_key(out / "s1.h5ad") == prepared_key(src, encoder.cache_key, params, stain):
    ...                                                  # already prepared with these inputs and options
```
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hist_st.encoders import Encoder
from hist_st.errors import InputError
from hist_st.slide import Slide, remove_stale_temporaries
from hist_st.sources import SlideSource, file_signature, short_hash
from hist_st.wsi import PatchParams

__all__ = ["CACHE_DIR", "PREPARE_VERSION", "LATTICE_VERSION", "embedding_cache_path", "prepared_key",
           "existing_key", "foreign_file", "pending_sources"]

CACHE_DIR = ".hist_st_cache"
PREPARE_VERSION = 1
#: Version of the lattice geometry in prepared slides (2: measured grid, `hist_st.io._util.attach_lattice`);
#: part of the prepared key only, so embedding caches stay valid.
LATTICE_VERSION = 2


def embedding_cache_path(
    out_dir: Path, slide: Slide, src: SlideSource, encoder: Encoder, params: PatchParams, stain: str | None
) -> Path:
    """The embedding cache file of ``slide`` (after its image and stored patches are resolved).

    The key covers the encoder, the patch geometry, the stain tag, the source fingerprint, the image and
    stored-patch files (size + mtime), the slide's um/px and its spot centres (float64 bytes).
    """
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


def prepared_key(src: SlideSource, encoder_key: str, params: PatchParams, stain: str | None) -> str:
    """The ``prepare_key`` a slide prepared from ``src`` with these options records."""
    return short_hash(PREPARE_VERSION, LATTICE_VERSION, src.fingerprint, encoder_key, params.as_dict(), stain)


def existing_key(path: Path) -> str | None:
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


def foreign_file(path: Path) -> bool:
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


def pending_sources(
    sources: Sequence[SlideSource], out_dir: Path, key: Callable[[SlideSource], str], *, overwrite: bool = False
) -> tuple[list[SlideSource], list[str], dict[str, str]]:
    """Split ``sources`` into the slides to prepare, those already prepared and those that must not be written.

    Leftover temporary files of an interrupted run are removed on the way (even next to a finished slide).

    Args:
        sources: The slides of the cohort.
        out_dir: The cohort folder.
        key: The ``prepare_key`` a source's slide would record (`prepared_key` with the run's options).
        overwrite: Prepare finished slides again.

    Returns:
        ``(to prepare, ids already prepared with the same key, id -> why refused)``; a file at the output
        path that hist-st did not write (e.g. an input ``.h5ad`` inside the cohort folder) is refused, never
        replaced.
    """
    todo: list[SlideSource] = []
    done: list[str] = []
    refused: dict[str, str] = {}
    for src in sources:
        dest = out_dir / f"{src.slide_id}.h5ad"
        remove_stale_temporaries(dest)  # left by an interrupted run, even when the slide itself is done
        if not overwrite and dest.is_file() and existing_key(dest) == key(src):
            done.append(src.slide_id)
        elif foreign_file(dest):
            refused[src.slide_id] = str(InputError(
                dest, "exists and is not a hist-st prepared slide (an input file?); it is never replaced: "
                "choose another --out folder or move the file"))
        else:
            todo.append(src)
    return todo, done, refused
