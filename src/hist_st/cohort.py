"""A cohort folder's manifest ``cohort.json`` and the gene-set spec every command uses.

`CohortManifest` is the only reader and writer of ``cohort.json`` (written by ``hist-st prepare`` through
`finalise_cohort`, the synthetic cohort and the toy cohort; read by training, cross-validation, the
experiments and the report). `finalise_cohort` restricts prepared slides to their shared genes, ranks them
(`hist_st.harmonise`) and writes the manifest.
A gene set is spelled the same way everywhere: ``hvg:2000`` (the top 2,000 HVGs of the cohort's ranking),
``he:250`` (the 250 most highly expressed), ``hest-bench:50``.

```python
from hist_st.cohort import CohortManifest, GeneSet
man = CohortManifest.read("cohorts/her2st")       # None when the folder has no cohort.json
man["hvg"][:5], man.slide_ids
GeneSet.parse("he:250")                          # GeneSet(ranking='highly_expressed', n=250)
```
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.errors import InputError
from hist_st.harmonise import (
    HEST_BENCH_METHOD,
    rank_hest_bench,
    rank_highly_expressed,
    rank_hvg,
    restrict_genes,
    shared_genes,
)
from hist_st.jsonio import write_json
from hist_st.slide import Slide, read_cohort_slide, write_prepared
from hist_st.wsi import PatchParams

__all__ = ["MANIFEST_NAME", "GENE_LIST_KEYS", "CohortManifest", "GeneSet", "RANKINGS", "read_manifest",
           "finalise_cohort"]

MANIFEST_NAME = "cohort.json"
#: Manifest keys holding gene lists (rankings best first, or the shared genes).
GENE_LIST_KEYS = ("genes", "hvg", "hvg_dataset", "highly_expressed")
#: Gene-set spec prefix -> the ranking it names (`hist_st.train.config.GeneConfig.ranking`).
RANKINGS = {"hvg": "hvg", "he": "highly_expressed", "highly_expressed": "highly_expressed",
            "hest-bench": "hest-bench"}
_SHORT = {"hvg": "hvg", "highly_expressed": "he", "hest-bench": "hest-bench"}


@dataclass(frozen=True)
class GeneSet:
    """Which genes a run predicts: the top ``n`` of a cohort ``ranking``.

    Attributes:
        ranking: ``hvg``, ``highly_expressed`` or ``hest-bench``.
        n: Number of genes.
    """

    ranking: str
    n: int

    @classmethod
    def parse(cls, spec: str, option: str = "--genes") -> GeneSet:
        """``"hvg:2000"`` / ``"he:250"`` / ``"highly_expressed:250"`` / ``"hest-bench:50"``; ``"hvg"`` alone
        means 2,000.

        Raises:
            InputError: An unknown ranking or a count that is not a positive integer, naming ``option``.
        """
        ranking, _, n = str(spec).partition(":")
        ranking = ranking.strip().lower()
        if ranking not in RANKINGS:
            raise InputError(option, f"unknown gene ranking {ranking!r} in {spec!r}; use hvg:N or he:N")
        try:
            count = int(n) if n.strip() else 2000
        except ValueError:
            raise InputError(option, f"{spec!r}: the gene count must be an integer") from None
        if count < 1:
            raise InputError(option, f"{spec!r}: the gene count must be positive")
        return cls(RANKINGS[ranking], count)

    @property
    def spec(self) -> str:
        """The canonical spelling, e.g. ``he:250``."""
        return f"{_SHORT[self.ranking]}:{self.n}"

    @property
    def label(self) -> str:
        """File-name-safe label, e.g. ``he250``."""
        return self.spec.replace(":", "")


class CohortManifest(Mapping[str, Any]):
    """A read-only view of a validated ``cohort.json`` (a mapping of its keys) with its path."""

    def __init__(self, data: Mapping[str, Any], path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._data = dict(data)
        _validate(self._data, self.path or MANIFEST_NAME)

    # -- reading and writing -----------------------------------------------------------------------------
    @classmethod
    def read(cls, folder: str | Path, *, required: bool = False) -> CohortManifest | None:
        """The manifest of a cohort folder (or the ``cohort.json`` file itself).

        Args:
            folder: A cohort folder or its ``cohort.json``.
            required: Raise when there is none (else return None).

        Raises:
            InputError: Not valid JSON, not an object, a gene list (`GENE_LIST_KEYS`) that is not a list of
                unique gene names, ``patients`` not a mapping; a missing file when ``required``.
        """
        path = Path(folder)
        if path.is_dir() or path.name != MANIFEST_NAME:
            path = path / MANIFEST_NAME
        if not path.is_file():
            if required:
                raise InputError(path, "cohort manifest not found (run `hist-st prepare` first)")
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(path, f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(path, f"must hold a JSON object, got {type(data).__name__}")
        return cls(data, path)

    @staticmethod
    def write(folder: str | Path, data: Mapping[str, Any]) -> Path:
        """Validate ``data`` and write it as ``folder/cohort.json`` (atomically). Returns the path."""
        path = Path(folder) / MANIFEST_NAME
        _validate(dict(data), path)
        return write_json(dict(data), path)

    # -- what it holds -----------------------------------------------------------------------------------
    @property
    def slide_ids(self) -> list[str]:
        """The cohort's slide ids (empty when not recorded)."""
        return [str(s) for s in self._data.get("slide_ids", [])]

    def ranking(self, name: str) -> list[str]:
        """The gene ranking ``name`` (best first).

        Raises:
            InputError: The manifest has no such ranking.
        """
        if name not in self._data:
            raise InputError(self.path or MANIFEST_NAME, f"has no {name!r} gene ranking (keys: {sorted(self._data)})")
        return [str(g) for g in self._data[name]]

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"CohortManifest({str(self.path)!r}, {len(self.slide_ids)} slides)"


def read_manifest(folder: str | Path) -> CohortManifest | None:
    """`CohortManifest.read` of a cohort folder: its manifest, or None when it has none."""
    return CohortManifest.read(folder)


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
    """Restrict prepared slides to their shared genes (rewriting those that change) and write ``cohort.json``.

    The last step of ``hist-st prepare``: the gene rankings (HVG, highly expressed, HEST-Benchmark) are
    computed over the shared genes of all slides, or of ``train_slides`` with ``hvg_scope="train-only"``
    (the all-slide HVG ranking is kept as ``hvg_dataset``). Slides skipped earlier stay listed under
    ``skipped`` until they are prepared.

    Args:
        out_dir: The cohort folder holding ``<slide_id>.h5ad``.
        slide_ids: The prepared slides of the cohort.
        encoder_name, encoder_dim: The encoder the slides were embedded with.
        params: The patch geometry.
        stain_norm: The stain tag (None: no normalisation).
        hvg_scope: ``"dataset"`` or ``"train-only"``.
        train_slides: The training slides for ``"train-only"``.
        skipped: Slide id -> why it was not prepared.

    Returns:
        The path of ``cohort.json``.

    Raises:
        InputError: A prediction file among the slides, no shared gene, unknown ``train_slides``.
    """
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
        "slides": [_slide_entry(sid, s) for sid, s in slides.items()],
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


def _slide_entry(sid: str, s: Slide) -> dict[str, Any]:
    """One slide's record in the manifest's ``slides`` list."""
    return {
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
        "n_patch_outside": int(np.asarray(s.patch_outside).sum()) if s.patch_outside is not None else 0,
        "image_scale": s.meta.get("image_scale"),
        "source_um_per_px": s.meta.get("source_um_per_px"),
        "patch_upsampling": s.meta.get("patch_upsampling"),
        "warnings": list(s.meta.get("warnings", [])),
    }


def _validate(data: dict[str, Any], where: str | Path) -> None:
    for key in GENE_LIST_KEYS:
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
            raise InputError(where, f"{key!r} must be a list of gene names, got {str(value)[:60]!r}")
        if len(set(value)) != len(value):
            raise InputError(where, f"{key!r} lists a gene more than once")
    if "patients" in data and not isinstance(data["patients"], dict):
        raise InputError(where, "'patients' must map slide ids to patients")
