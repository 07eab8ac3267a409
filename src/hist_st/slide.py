"""The `Slide` record and the prepared-slide file contract.

Data flows one way through hist-st: files -> `Slide` records -> lattice batches -> model -> predictions.
Every reader (`hist_st.io`) returns a `Slide`; `hist-st prepare` and the synthetic cohort write one
AnnData ``.h5ad`` per slide with `write_prepared`; training, evaluation and the baselines read them
back with `read_prepared`.

Prepared-slide contract (one ``.h5ad`` per slide):

- ``X``: raw counts, ``scipy.sparse.csr_matrix`` float32 [N, G] (absent for H&E-only slides);
- ``obs_names``: spot barcodes; ``var_names``: gene symbols; every obs/var column the input had
  (Space Ranger: obs ``in_tissue``, ``array_row``, ``array_col``; var ``gene_ids``, ``feature_types``,
  ``genome``, as ``scanpy.read_visium`` writes them) is kept;
- ``obsm['spatial']``: float64 [N, 2] spot centres (x, y) in full-resolution image pixels;
- ``obsm['array']``: int64 [N, 2] (row, col) array coordinates, when the technology has them;
- ``obsm['lattice']``: int64 [N, 2] collision-free integer lattice sites (`hist_st.lattice.to_lattice`);
- ``obsm['X_<encoder>']``: float32 [N, C] patch embeddings, one entry per encoder;
- ``obs['patch_outside']``: bool, the spot's patch reached outside the image and was padded;
- ``uns['hist_st']``: slide id, patient, technology, um per pixel, spot pitch (um), lattice unit (um),
  image path, free-form metadata;
- ``uns['spatial'][library_id]``: ``images`` and ``scalefactors`` as 10x defines them (Visium: the original
  ``hires``/``lowres`` images and ``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``spot_diameter_fullres``,
  ``fiducial_diameter_fullres``), so ``scanpy.pl.spatial`` / squidpy plot a prepared Visium slide exactly
  like ``scanpy.read_visium`` of the same folder; other slides carry hist-st's thumbnail as ``hires``
  (or under ``hist_st_thumbnail`` with ``tissue_hist_st_thumbnail_scalef`` when an original ``hires``
  exists) and ``spot_diameter_fullres`` (half the pitch: the ST/Visium spot-to-pitch ratio);
- ``obsp['spatial_connectivities']``/``obsp['spatial_distances']`` + ``uns['spatial_neighbors']``: the
  spot grid's neighbour graph (6 neighbours on hexagonal grids, 4 on square ones) in squidpy's layout, so
  ``squidpy.gr`` functions use the right grid without calling ``spatial_neighbors``;
  ``uns['hist_st']['grid']`` says ``"hex"`` or ``"square"``.

Prediction files (``uns['hist_st']['kind'] == "prediction"``; never read as prepared slides):
``X`` = predicted counts ``relu(expm1(y_hat))`` float32 [N, G], ``layers['log1p']`` = ``log1p(X)``,
``layers['mc_std']`` = Monte Carlo dropout std of the counts (when drawn), ``layers['measured_counts']``
= the measured counts of the same genes (when the input had them).
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
import pandas as pd
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
        obs: Optional per-spot annotations the input carried (rows aligned with ``barcodes``).
        var: Optional per-gene annotations the input carried (rows aligned with ``genes``).
        library_id: The library id of ``uns['spatial']`` (Visium: the sample's own; default ``slide_id``).
        spatial_images: Original images by 10x key (``hires``, ``lowres``), uint8 ``[h, w, 3]``.
        scalefactors: 10x scale factors as 10x defines them (``tissue_<key>_scalef``, ``spot_diameter_fullres``,
            ``fiducial_diameter_fullres``).
        image_scale: ``image`` pixels per full-resolution pixel (1.0: the image is the full-resolution one).
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
    obs: pd.DataFrame | None = None
    var: pd.DataFrame | None = None
    library_id: str | None = None
    spatial_images: dict[str, np.ndarray] = field(default_factory=dict)
    scalefactors: dict[str, float] = field(default_factory=dict)
    image_scale: float | None = None

    #: Per-spot array fields (rows aligned with ``barcodes``), besides ``spatial``, ``counts``, ``embeddings``, ``obs``.
    SPOT_FIELDS = ("array_coords", "lattice", "patch_outside", "predicted", "predicted_std")

    #: Fields of the section rather than of its spots: `on_spots` keeps them.
    SECTION_FIELDS = ("slide_id", "um_per_px", "technology", "patient", "image", "thumbnail", "thumbnail_scale",
                      "library_id", "image_scale")

    def on_spots(self, spatial: np.ndarray, barcodes: np.ndarray, **fields: Any) -> Slide:
        """A new slide of the same section (`SECTION_FIELDS`: id, image, thumbnail, resolution, technology,
        patient, library) on the spots ``spatial`` / ``barcodes``; every other field is its default unless
        given in ``fields`` (which may also replace a section field)."""
        return Slide(spatial=spatial, barcodes=barcodes,
                     **{**{name: getattr(self, name) for name in self.SECTION_FIELDS}, **fields})

    def take_spots(self, index: np.ndarray) -> Slide:
        """Keep the spots ``index`` (int positions or a bool mask), in that order, in every per-spot field."""
        idx = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index, dtype=np.int64)
        self.spatial = np.asarray(self.spatial)[idx]
        self.barcodes = np.asarray(self.barcodes)[idx]
        if self.counts is not None:
            self.counts = sp.csr_matrix(self.counts)[idx]
        for name in self.SPOT_FIELDS:
            arr = getattr(self, name)
            if arr is not None:
                setattr(self, name, np.asarray(arr)[idx])
        self.embeddings = {k: np.asarray(v)[idx] for k, v in self.embeddings.items()}
        if self.obs is not None:
            self.obs = self.obs.iloc[idx]
        return self

    @property
    def is_prediction(self) -> bool:
        """True for a prediction file's slide (``predicted`` set): never a prepared training slide."""
        return self.predicted is not None

    @property
    def grid(self) -> str | None:
        """``"hex"`` or ``"square"``: the spot grid (pseudo-spot record, measured grid, else the technology)."""
        ps = self.meta.get("pseudo_spots") if isinstance(self.meta, dict) else None
        if isinstance(ps, dict) and ps.get("lattice") in ("hex", "square"):
            return str(ps["lattice"])
        measured = self.meta.get("spot_grid") if isinstance(self.meta, dict) else None
        if isinstance(measured, dict) and measured.get("kind") in ("hex", "square"):
            return str(measured["kind"])  # `hist_st.lattice.geometry.measure_grid` of the spots
        if isinstance(self.meta, dict) and self.meta.get("grid") in ("hex", "square"):
            return str(self.meta["grid"])
        return {"visium": "hex", "st": "square", "synthetic-hex": "hex"}.get(self.technology)

    def plot_image(self) -> tuple[np.ndarray | None, float]:
        """The best image to draw spots on and its scale (image px per full-resolution px).

        hist-st's thumbnail when present, else the original ``hires`` image unless it is blank, else
        ``lowres``; ``(None, 1.0)`` without any image.
        """
        if self.thumbnail is not None:
            return self.thumbnail, float(self.thumbnail_scale or 1.0)
        for key in ("hires", "lowres"):
            img = self.spatial_images.get(key)
            sf = self.scalefactors.get(f"tissue_{key}_scalef")
            if img is not None and sf and float(np.asarray(img).std()) > 1.0:
                return np.asarray(img), float(sf)
        return None, 1.0

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
        if self.obs is not None and len(self.obs) != n:
            raise InputError(src, f"obs annotations have {len(self.obs)} rows but the slide has {n} spots")
        if self.var is not None and len(self.var) != len(self.genes):
            raise InputError(src, f"var annotations have {len(self.var)} rows but the slide has {len(self.genes)} genes")
        for name in self.SPOT_FIELDS:
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


THUMBNAIL_KEY = "hist_st_thumbnail"  # image key of hist-st's thumbnail when an original ``hires`` exists


def _frame_for_h5ad(df: pd.DataFrame, index: list[str], name: str) -> pd.DataFrame:
    """A copy of ``df`` on ``index`` whose object columns are strings (h5ad cannot store mixed objects)."""
    out = pd.DataFrame(index=pd.Index(index, name=name))
    for col in df.columns:
        v = df[col]
        if v.dtype == object:
            v = v.astype(str)
        out[str(col)] = v.to_numpy()
    return out


def neighbour_graph(slide: Slide) -> tuple[sp.csr_matrix, sp.csr_matrix, int] | None:
    """The spot grid's neighbour graph from array coordinates, in squidpy's ``spatial_neighbors`` layout.

    Hexagonal grids (Visium array coordinates: columns step by 2 along a row) link ``(r, c +- 2)`` and
    ``(r +- 1, c +- 1)``: 6 neighbours; square grids link ``(r +- 1, c)`` and ``(r, c +- 1)``: 4 neighbours.

    Returns:
        ``(connectivities [N, N] 0/1, distances [N, N] in full-resolution px, neighbours per spot)`` or None
        when the slide has no array coordinates or no known grid.
    """
    grid = slide.grid
    if slide.array_coords is None or grid not in ("hex", "square"):
        return None
    rc = np.asarray(slide.array_coords, dtype=np.int64)
    steps = [(0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1)] if grid == "hex" else [
        (0, 1), (0, -1), (1, 0), (-1, 0)]
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(rc)}
    rows, cols = [], []
    for i, (r, c) in enumerate(rc):
        for dr, dc in steps:
            j = index.get((int(r) + dr, int(c) + dc))
            if j is not None and j != i:
                rows.append(i)
                cols.append(j)
    n = len(rc)
    rows_a, cols_a = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    conn = sp.csr_matrix((np.ones(len(rows_a), np.float32), (rows_a, cols_a)), shape=(n, n))
    xy = np.asarray(slide.spatial, dtype=np.float64)
    d = np.sqrt(((xy[rows_a] - xy[cols_a]) ** 2).sum(1)) if len(rows_a) else np.zeros(0)
    dist = sp.csr_matrix((d.astype(np.float32), (rows_a, cols_a)), shape=(n, n))
    return conn, dist, len(steps)


def slide_to_anndata(slide: Slide):
    """Build the prepared-slide (or prediction) AnnData of ``slide`` (see the module docstring for the keys)."""
    import anndata as ad

    barcodes = [str(b) for b in slide.barcodes]
    genes = [str(g) for g in slide.genes]
    obs = _frame_for_h5ad(slide.obs, barcodes, "barcode") if slide.obs is not None else pd.DataFrame(
        index=pd.Index(barcodes, name="barcode"))
    if slide.patch_outside is not None:
        obs["patch_outside"] = np.asarray(slide.patch_outside, dtype=bool)
    var = _frame_for_h5ad(slide.var, genes, "gene") if slide.var is not None else pd.DataFrame(
        index=pd.Index(genes, name="gene"))
    layers: dict[str, Any] = {}
    if slide.predicted is not None:
        x = np.asarray(slide.predicted, dtype=np.float32)
        layers["log1p"] = np.log1p(x)
        if slide.predicted_std is not None:
            layers["mc_std"] = np.asarray(slide.predicted_std, dtype=np.float32)
        if slide.counts is not None:
            layers["measured_counts"] = sp.csr_matrix(slide.counts, dtype=np.float32)
    elif slide.counts is not None:
        x = sp.csr_matrix(slide.counts, dtype=np.float32)
    else:
        x = None
    adata = ad.AnnData(X=x, obs=obs, var=var, layers=layers or None)
    adata.obsm["spatial"] = np.asarray(slide.spatial, dtype=np.float64)
    if slide.array_coords is not None:
        adata.obsm["array"] = np.asarray(slide.array_coords, dtype=np.int64)
    if slide.lattice is not None:
        adata.obsm["lattice"] = np.asarray(slide.lattice, dtype=np.int64)
    for key, emb in slide.embeddings.items():
        adata.obsm[f"X_{key}"] = np.asarray(emb, dtype=np.float32)
    library = slide.library_id or slide.slide_id
    images = {k: np.asarray(v, dtype=np.uint8) for k, v in slide.spatial_images.items()}
    scalefactors = {k: float(v) for k, v in slide.scalefactors.items() if v is not None}
    thumbnail_key = ""
    if slide.thumbnail is not None:
        thumbnail_key = "hires" if "hires" not in images else THUMBNAIL_KEY
        images[thumbnail_key] = np.asarray(slide.thumbnail, dtype=np.uint8)
        scalefactors[f"tissue_{thumbnail_key}_scalef"] = float(slide.thumbnail_scale or 1.0)
    if "spot_diameter_fullres" not in scalefactors:
        if slide.um_per_px and slide.spot_pitch_um:
            # half the pitch (the ST/Visium spot-to-pitch ratio), in full-resolution px
            scalefactors["spot_diameter_fullres"] = float(0.5 * slide.spot_pitch_um / slide.um_per_px)
        else:
            scalefactors["spot_diameter_fullres"] = float(_nearest_neighbour_distance(slide.spatial) * 0.5)
    adata.uns["spatial"] = {library: {"images": images, "scalefactors": scalefactors, "metadata": {}}}
    graph = neighbour_graph(slide)
    if graph is not None:
        conn, dist, k = graph
        adata.obsp["spatial_connectivities"] = conn
        adata.obsp["spatial_distances"] = dist
        adata.uns["spatial_neighbors"] = {
            "connectivities_key": "spatial_connectivities",
            "distances_key": "spatial_distances",
            "params": {"n_neighbors": k, "coord_type": "grid", "radius": "none", "transform": "none",
                       "source": f"hist-st: {slide.grid} spot grid from array coordinates"},
        }
    adata.uns["hist_st"] = {
        "kind": "prediction" if slide.predicted is not None else "prepared",
        "slide_id": slide.slide_id,
        "library_id": library,
        "patient": slide.patient if slide.patient is not None else "",
        "technology": slide.technology,
        "grid": slide.grid or "",
        "um_per_px": float(slide.um_per_px) if slide.um_per_px is not None else float("nan"),
        "spot_pitch_um": float(slide.spot_pitch_um) if slide.spot_pitch_um is not None else float("nan"),
        "lattice_unit_um": float(slide.lattice_unit_um) if slide.lattice_unit_um is not None else float("nan"),
        "image": slide.image or "",
        "image_scale": float(slide.image_scale) if slide.image_scale is not None else float("nan"),
        "thumbnail_key": thumbnail_key,
        "meta_json": json.dumps(slide.meta, default=str),
        "has_counts": slide.counts is not None,
    }
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


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if sp.issparse(m) else m, dtype=np.float32)


def anndata_to_slide(adata, source: str | Path | None = None) -> Slide:
    """Read a `Slide` back from a prepared-slide or prediction AnnData; raise `InputError` naming ``source``."""
    src = source if source is not None else "AnnData"
    if "spatial" not in adata.obsm:
        raise InputError(src, "obsm['spatial'] (spot x, y pixel coordinates) is missing")
    info = dict(adata.uns.get("hist_st", {}))
    slide_id = str(info.get("slide_id") or (Path(source).stem if source else "slide"))
    kind = str(info.get("kind", ""))
    legacy_prediction = "predicted" in adata.layers
    is_prediction = kind == "prediction" or legacy_prediction
    counts, predicted, predicted_std = None, None, None
    if is_prediction:
        if legacy_prediction:  # files of hist-st < 0.2: predictions in a layer, zeros or counts in X
            predicted = _dense(adata.layers["predicted"])
            predicted_std = _dense(adata.layers["predicted_std"]) if "predicted_std" in adata.layers else None
            if adata.X is not None and bool(info.get("has_counts", False)):
                counts = sp.csr_matrix(adata.X, dtype=np.float32)
        else:
            predicted = _dense(adata.X)
            predicted_std = _dense(adata.layers["mc_std"]) if "mc_std" in adata.layers else None
            if "measured_counts" in adata.layers:
                counts = sp.csr_matrix(adata.layers["measured_counts"], dtype=np.float32)
    elif adata.X is not None and bool(info.get("has_counts", True)):
        counts = sp.csr_matrix(adata.X, dtype=np.float32)
    embeddings = {k[2:]: np.asarray(v, dtype=np.float32) for k, v in adata.obsm.items() if k.startswith("X_")}
    spatial_uns = adata.uns.get("spatial", {})
    library = str(info.get("library_id") or slide_id)
    if library not in spatial_uns and len(spatial_uns) == 1:
        library = next(iter(spatial_uns))
    lib = spatial_uns.get(library, {})
    images = {str(k): np.asarray(v) for k, v in lib.get("images", {}).items()}
    scalefactors = {str(k): float(v) for k, v in lib.get("scalefactors", {}).items()}
    thumb_key = str(info.get("thumbnail_key", "hires" if "kind" not in info else ""))
    thumb, scale = None, None
    if thumb_key and thumb_key in images:
        thumb = images.pop(thumb_key)
        scale = float(scalefactors.pop(f"tissue_{thumb_key}_scalef", 1.0))
    obs_cols = [c for c in adata.obs.columns if c != "patch_outside"]
    meta_json = info.get("meta_json", "{}")
    image_scale = _nan_to_none(info.get("image_scale", float("nan")))
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
        predicted=predicted,
        predicted_std=predicted_std,
        meta=json.loads(meta_json) if isinstance(meta_json, str) else {},
        obs=adata.obs[obs_cols].copy() if obs_cols else None,
        var=adata.var.copy() if len(adata.var.columns) else None,
        library_id=library if library != slide_id else None,
        spatial_images=images,
        scalefactors=scalefactors,
        image_scale=image_scale,
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

    Prediction files (`hist_st.train.predict.predict_slide`) carry ``uns['hist_st']['kind'] ==
    "prediction"`` and ``meta['prediction']`` (older ones ``layers['predicted']``); a path is checked cheaply
    without reading the matrices. An unreadable file is not a prediction file (its readers report it).
    """
    if isinstance(slide, Slide):
        return slide.is_prediction or "prediction" in slide.meta
    import h5py

    try:
        with h5py.File(slide, "r") as f:
            if "layers/predicted" in f:
                return True
            kind = f["uns/hist_st/kind"][()] if "uns/hist_st/kind" in f else b""
            if (kind.decode() if isinstance(kind, bytes) else str(kind)) == "prediction":
                return True
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
