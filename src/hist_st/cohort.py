"""A cohort folder's manifest ``cohort.json`` and the gene-set spec every command uses.

`CohortManifest` is the only reader and writer of ``cohort.json`` (written by ``hist-st prepare``, the
synthetic cohort and the toy cohort; read by training, cross-validation, the experiments and the report).
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hist_st.errors import InputError
from hist_st.jsonio import write_json

__all__ = ["MANIFEST_NAME", "GENE_LIST_KEYS", "CohortManifest", "GeneSet", "RANKINGS", "read_manifest"]

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
