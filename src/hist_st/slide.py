"""The `Slide` record and the prepared-slide file contract.

Data flows one way through hist-st: files -> `Slide` records -> lattice batches -> model -> predictions.
Every reader (`hist_st.io`) returns a `Slide`; `hist-st prepare` and the synthetic cohort write one
AnnData ``.h5ad`` per slide with `write_prepared`; training, evaluation and the baselines read them
back with `read_prepared`.

Prepared-slide contract (one ``.h5ad`` per slide):

- ``X``: raw counts, ``scipy.sparse.csr_matrix`` float32 [N, G] (absent for H&E-only slides);
- ``obs_names``: spot barcodes; ``var_names``: gene symbols;
- ``obsm['spatial']``: float64 [N, 2] spot centres (x, y) in full-resolution image pixels;
- ``obsm['array']``: int64 [N, 2] (row, col) array coordinates, when the technology has them;
- ``obsm['lattice']``: int64 [N, 2] collision-free integer lattice sites (`hist_st.lattice.to_lattice`);
- ``obsm['X_<encoder>']``: float32 [N, C] patch embeddings, one entry per encoder;
- ``obs['patch_outside']``: bool, the spot's patch reached outside the image and was padded;
- ``uns['hist_st']``: slide id, patient, technology, um per pixel, spot pitch (um), lattice unit (um),
  image path, free-form metadata;
- ``uns['spatial'][slide_id]``: ``images`` (optional ``hires`` thumbnail) and ``scalefactors``, so
  ``scanpy.pl.spatial`` / squidpy plot the slide directly;
- ``layers['predicted']`` (prediction files only): predicted counts ``relu(expm1(y_hat))`` [N, G], and
  ``layers['predicted_std']`` when Monte Carlo samples were drawn.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hist_st.errors import InputError

__all__ = ["Slide", "read_prepared", "write_prepared", "slide_to_anndata", "anndata_to_slide", "atomic_path",
           "atomic_write"]

# Default lattice unit per technology (um). Legacy ST spots sit 200 um apart on a square grid, Visium
# spots 100 um apart on a hexagonal grid; the authors map Visium with the 55 um spot diameter (SPEC 1).
DEFAULT_LATTICE_UNIT_UM = {"st": 200.0, "visium": 55.0, "visium-hd": 8.0, "synthetic-hex": 55.0}


@dataclass
class Slide:
    """One tissue section: spots, their coordinates, counts, embeddings and acquisition metadata.

    Attributes:
        slide_id: Unique identifier of the section (also the file stem of its prepared ``.h5ad``).
        spatial: Spot centres ``[N, 2]`` (x, y) in full-resolution image pixels, float64.
        barcodes: Spot identifiers ``[N]``.
        genes: Gene symbols ``[G]`` (empty for an H&E-only slide).
        counts: Raw counts ``[N, G]`` as CSR float32, or None for an H&E-only slide.
        array_coords: Array (row, col) coordinates ``[N, 2]`` int64, when the technology has them.
        lattice: Integer lattice sites ``[N, 2]`` int64, once computed.
        embeddings: Patch embeddings by encoder name, each ``[N, C]`` float32.
        um_per_px: Microns per full-resolution pixel.
        spot_pitch_um: Centre-to-centre spot distance in microns.
        lattice_unit_um: Lattice unit used to compute ``lattice``.
        technology: ``"st"``, ``"visium"``, ``"synthetic"``, ``"he-only"``, ...
        patient: Patient (or other grouping) identifier.
        image: Path of the H&E image, if any.
        thumbnail: Optional small RGB image ``[h, w, 3]`` uint8 and its scale factor (thumb px / full px).
        patch_outside: Optional bool ``[N]``: the spot's patch reached outside the image.
        predicted: Optional predicted counts ``[N, G]`` float32; ``predicted_std`` its MC std.
        meta: Free-form metadata (JSON-serialisable).
    """

    slide_id: str
    spatial: np.ndarray
    barcodes: np.ndarray
    genes: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    counts: sp.csr_matrix | None = None
    array_coords: np.ndarray | None = None
    lattice: np.ndarray | None = None
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    um_per_px: float | None = None
    spot_pitch_um: float | None = None
    lattice_unit_um: float | None = None
    technology: str = "unknown"
    patient: str | None = None
    image: str | None = None
    thumbnail: np.ndarray | None = None
    thumbnail_scale: float | None = None
    patch_outside: np.ndarray | None = None
    predicted: np.ndarray | None = None
    predicted_std: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return int(self.spatial.shape[0])

    @property
    def n_genes(self) -> int:
        return int(len(self.genes))

    def validate(self, source: str | Path | None = None) -> Slide:
        """Check shapes and values; raise `InputError` naming ``source`` and the problem.

        Checks: at least one spot; finite, non-negative, unique spot coordinates; every per-spot array
        has N rows; counts finite and non-negative; gene names unique; embeddings finite.
        """
        src = source if source is not None else f"slide {self.slide_id!r}"
        spatial = np.asarray(self.spatial)
        if spatial.ndim != 2 or spatial.shape[1] != 2:
            raise InputError(src, f"spot coordinates must have shape [N, 2], got {spatial.shape}")
        n = spatial.shape[0]
        if n == 0:
            raise InputError(src, "the slide has zero spots")
        if not np.all(np.isfinite(spatial)):
            bad = int((~np.isfinite(spatial)).any(axis=1).sum())
            raise InputError(src, f"{bad} spot coordinate(s) are NaN or infinite")
        if (spatial < 0).any():
            bad = int((spatial < 0).any(axis=1).sum())
            raise InputError(src, f"{bad} spot coordinate(s) are negative; pixel coordinates must be >= 0")
        uniq = np.unique(spatial, axis=0)
        if uniq.shape[0] != n:
            raise InputError(src, f"{n - uniq.shape[0]} spot(s) share coordinates with another spot")
        if len(self.barcodes) != n:
            raise InputError(src, f"{len(self.barcodes)} barcodes but {n} spot coordinates")
        if len(set(map(str, self.barcodes))) != n:
            raise InputError(src, "spot barcodes are not unique")
        for name in ("array_coords", "lattice", "patch_outside", "predicted", "predicted_std"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise InputError(src, f"{name} has {len(arr)} rows but the slide has {n} spots")
        for key, emb in self.embeddings.items():
            if emb.ndim != 2 or emb.shape[0] != n:
                raise InputError(src, f"embedding {key!r} has shape {emb.shape}, expected [{n}, C]")
            if not np.all(np.isfinite(emb)):
                raise InputError(src, f"embedding {key!r} contains NaN or infinite values")
        if self.counts is not None:
            counts = self.counts
            if counts.shape != (n, len(self.genes)):
                raise InputError(
                    src, f"counts have shape {counts.shape} but there are {n} spots and {len(self.genes)} genes"
                )
            data = counts.data if sp.issparse(counts) else np.asarray(counts)
            if not np.all(np.isfinite(data)):
                raise InputError(src, "counts contain NaN or infinite values")
            if (data < 0).any():
                raise InputError(src, "counts contain negative values")
        if len(set(map(str, self.genes))) != len(self.genes):
            raise InputError(src, "gene names are not unique (harmonise the slide first)")
        return self


#: Marks this process's temporary files: a temporary file whose pid is alive but whose token differs
#: from ours comes from an earlier process that had the same pid (containers reuse small pids).
_PROCESS_TOKEN = os.urandom(4).hex()
_TEMP_NAME = re.compile(r"(\d+)-([0-9a-f]{8})-[a-z0-9_]+")
_LEGACY_TEMP_NAME = re.compile(r"[a-z0-9_]{8}")


def _writer_alive(pid: int, token: str) -> bool:
    if pid == os.getpid():
        return token == _PROCESS_TOKEN
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours to signal: leave its files alone
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete temporary files of earlier, interrupted writes of ``path`` (e.g. after ``kill -9``).

    A temporary file of ``path`` is ``.<name>.<pid>-<token>-<random>.tmp`` beside it; it is stale when
    its writer process is gone (or is an earlier process with a reused pid). Files of older hist-st
    versions (``.<name>.<random>.tmp``, no pid) are always stale. Returns the files removed.
    """
    final = Path(path)
    removed = []
    prefix = f".{final.name}."
    for tmp in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        middle = tmp.name[len(prefix) : -len(".tmp")]
        ours = _TEMP_NAME.fullmatch(middle)
        if ours is None and _LEGACY_TEMP_NAME.fullmatch(middle) is None:
            continue  # another file's temporary (``.<name>.<more>...``) or not one of ours
        if ours is not None and _writer_alive(int(ours.group(1)), ours.group(2)):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def atomic_path(path: str | Path) -> tuple[Path, Path]:
    """Return ``(final, temporary)`` paths for a write-then-rename in the same directory.

    Stale temporary files of earlier interrupted writes of the same ``path`` are removed first
    (`remove_stale_temporaries`).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}-{_PROCESS_TOKEN}-", suffix=".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    return final, Path(tmp)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error remove it.

    Whatever was at ``path`` before stays intact until the new file is complete.
    """
    final, tmp = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def slide_to_anndata(slide: Slide):
    """Build the prepared-slide AnnData of ``slide`` (see the module docstring for the keys)."""
    import anndata as ad
    import pandas as pd

    n = slide.n_spots
    obs = pd.DataFrame(index=pd.Index([str(b) for b in slide.barcodes], name="barcode"))
    if slide.patch_outside is not None:
        obs["patch_outside"] = np.asarray(slide.patch_outside, dtype=bool)
    var = pd.DataFrame(index=pd.Index([str(g) for g in slide.genes], name="gene"))
    x = None
    if slide.counts is not None:
        x = sp.csr_matrix(slide.counts, dtype=np.float32)
    elif slide.predicted is not None:
        x = sp.csr_matrix((n, len(slide.genes)), dtype=np.float32)
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.obsm["spatial"] = np.asarray(slide.spatial, dtype=np.float64)
    if slide.array_coords is not None:
        adata.obsm["array"] = np.asarray(slide.array_coords, dtype=np.int64)
    if slide.lattice is not None:
        adata.obsm["lattice"] = np.asarray(slide.lattice, dtype=np.int64)
    for key, emb in slide.embeddings.items():
        adata.obsm[f"X_{key}"] = np.asarray(emb, dtype=np.float32)
    if slide.predicted is not None:
        adata.layers["predicted"] = np.asarray(slide.predicted, dtype=np.float32)
    if slide.predicted_std is not None:
        adata.layers["predicted_std"] = np.asarray(slide.predicted_std, dtype=np.float32)
    info = {
        "slide_id": slide.slide_id,
        "patient": slide.patient if slide.patient is not None else "",
        "technology": slide.technology,
        "um_per_px": float(slide.um_per_px) if slide.um_per_px is not None else float("nan"),
        "spot_pitch_um": float(slide.spot_pitch_um) if slide.spot_pitch_um is not None else float("nan"),
        "lattice_unit_um": float(slide.lattice_unit_um) if slide.lattice_unit_um is not None else float("nan"),
        "image": slide.image or "",
        "meta_json": json.dumps(slide.meta, default=str),
        "has_counts": slide.counts is not None,
    }
    adata.uns["hist_st"] = info
    scalefactors: dict[str, float] = {"tissue_hires_scalef": float(slide.thumbnail_scale or 1.0)}
    if slide.um_per_px and slide.spot_pitch_um:
        # Spot diameter for plotting: half the pitch (the ST/Visium spot-to-pitch ratio), in full-res px.
        scalefactors["spot_diameter_fullres"] = float(0.5 * slide.spot_pitch_um / slide.um_per_px)
    else:
        scalefactors["spot_diameter_fullres"] = float(_nearest_neighbour_distance(slide.spatial) * 0.5)
    images = {}
    if slide.thumbnail is not None:
        images["hires"] = np.asarray(slide.thumbnail, dtype=np.uint8)
    adata.uns["spatial"] = {slide.slide_id: {"images": images, "scalefactors": scalefactors, "metadata": {}}}
    return adata


def _nearest_neighbour_distance(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 1.0
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def _nan_to_none(v: Any) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


def anndata_to_slide(adata, source: str | Path | None = None) -> Slide:
    """Read a `Slide` back from a prepared-slide AnnData; raise `InputError` naming ``source``."""
    src = source if source is not None else "AnnData"
    if "spatial" not in adata.obsm:
        raise InputError(src, "obsm['spatial'] (spot x, y pixel coordinates) is missing")
    info = dict(adata.uns.get("hist_st", {}))
    slide_id = str(info.get("slide_id") or (Path(source).stem if source else "slide"))
    counts = None
    has_counts = bool(info.get("has_counts", "predicted" not in adata.layers))
    if adata.X is not None and has_counts:
        counts = sp.csr_matrix(adata.X, dtype=np.float32)
    embeddings = {k[2:]: np.asarray(v, dtype=np.float32) for k, v in adata.obsm.items() if k.startswith("X_")}
    thumb, scale = None, None
    spatial_uns = adata.uns.get("spatial", {}).get(slide_id, {})
    if "hires" in spatial_uns.get("images", {}):
        thumb = np.asarray(spatial_uns["images"]["hires"])
        scale = float(spatial_uns.get("scalefactors", {}).get("tissue_hires_scalef", 1.0))
    meta_json = info.get("meta_json", "{}")
    slide = Slide(
        slide_id=slide_id,
        spatial=np.asarray(adata.obsm["spatial"], dtype=np.float64),
        barcodes=np.asarray(adata.obs_names, dtype=object),
        genes=np.asarray(adata.var_names, dtype=object),
        counts=counts,
        array_coords=np.asarray(adata.obsm["array"], dtype=np.int64) if "array" in adata.obsm else None,
        lattice=np.asarray(adata.obsm["lattice"], dtype=np.int64) if "lattice" in adata.obsm else None,
        embeddings=embeddings,
        um_per_px=_nan_to_none(info.get("um_per_px", float("nan"))),
        spot_pitch_um=_nan_to_none(info.get("spot_pitch_um", float("nan"))),
        lattice_unit_um=_nan_to_none(info.get("lattice_unit_um", float("nan"))),
        technology=str(info.get("technology", "unknown")),
        patient=(str(info["patient"]) or None) if "patient" in info else None,
        image=str(info.get("image")) or None if info.get("image") else None,
        thumbnail=thumb,
        thumbnail_scale=scale,
        patch_outside=np.asarray(adata.obs["patch_outside"], dtype=bool) if "patch_outside" in adata.obs else None,
        predicted=np.asarray(adata.layers["predicted"], dtype=np.float32) if "predicted" in adata.layers else None,
        predicted_std=(
            np.asarray(adata.layers["predicted_std"], dtype=np.float32) if "predicted_std" in adata.layers else None
        ),
        meta=json.loads(meta_json) if isinstance(meta_json, str) else {},
    )
    return slide.validate(src)


def write_prepared(slide: Slide, path: str | Path) -> Path:
    """Validate ``slide`` and write it atomically to ``path`` (temporary name, then rename).

    Returns:
        The final path. A failure leaves any existing file at ``path`` untouched.
    """
    slide.validate(path)
    with atomic_write(path) as tmp:
        slide_to_anndata(slide).write_h5ad(tmp, compression="gzip")
    return Path(path)


def read_prepared(path: str | Path) -> Slide:
    """Read and validate one prepared slide; raise `InputError` naming the file on any problem."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "prepared slide not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for truncated or foreign files
        raise InputError(path, f"cannot read as an AnnData .h5ad file ({type(exc).__name__}: {exc})") from exc
    return anndata_to_slide(adata, path)


def is_prediction(slide: Slide | str | Path) -> bool:
    """True when ``slide`` (a `Slide` or a ``.h5ad`` path) is a prediction file, not a prepared slide.

    Prediction files (`hist_st.train.predict.predict_slide`) carry ``meta['prediction']``; a path is
    checked cheaply through ``uns['hist_st']['meta_json']`` without reading the matrices. An unreadable
    file is not a prediction file (its readers report it).
    """
    if isinstance(slide, Slide):
        return "prediction" in slide.meta
    import h5py

    try:
        with h5py.File(slide, "r") as f:
            raw = f["uns/hist_st/meta_json"][()]
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except Exception:  # noqa: BLE001 - absent, truncated or foreign files are not prediction files
        return False
    return isinstance(meta, dict) and "prediction" in meta


def refuse_prediction(slide: Slide, source: str | Path) -> Slide:
    """Return ``slide``; raise `InputError` naming ``source`` when it is a prediction file."""
    if is_prediction(slide):
        raise InputError(
            source,
            "is a prediction file written by `hist-st predict`, not a prepared slide (its counts are "
            "predictions); keep predictions out of cohort folders, or re-prepare this slide with `hist-st prepare`",
        )
    return slide


def read_cohort_slide(path: str | Path) -> Slide:
    """Read a prepared slide of a cohort folder (for training, preparing and predicting).

    `read_prepared`, plus: any unexpected failure on a damaged file becomes an `InputError` naming the
    file, and a prediction file is refused (`refuse_prediction`).
    """
    try:
        slide = read_prepared(path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a readable but damaged file fails in many ways
        raise InputError(path, f"not a valid prepared slide ({type(exc).__name__}: {exc})") from None
    return refuse_prediction(slide, path)
