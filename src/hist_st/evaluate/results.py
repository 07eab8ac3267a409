"""Typed results of a cross-validation (`hist_st.evaluate.run_cv`): per fold, per method, and the run.

``to_json()`` gives exactly what the run folder's ``metrics.json`` / ``fold_<i>/metrics.json`` hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hist_st.jsonio import to_jsonable
from hist_st.metrics import format_table

__all__ = ["CVResult", "FoldRecord", "MethodSummary"]


@dataclass(frozen=True)
class FoldRecord:
    """One fold: its slides, genes and every method's `evaluate_fold` record (label -> record)."""

    fold: int
    train: tuple[str, ...]
    test: tuple[str, ...]
    genes: tuple[str, ...]
    metrics: Mapping[str, Mapping[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """The content of ``fold_<i>/metrics.json``: each method's record, per-gene values keyed by gene."""
        genes, metrics = self.genes, to_jsonable({m: dict(r) for m, r in self.metrics.items()})
        for pg in (r.get("per_gene", {}) for r in metrics.values()):
            for key in ("pcc_per_gene", "r2_per_gene"):
                if isinstance(pg.get(key), list) and len(pg[key]) == len(genes):
                    pg[key] = dict(zip(genes, pg[key]))
            if isinstance(pg.get("excluded_genes"), list):
                pg["excluded_genes"] = [genes[i] for i in pg["excluded_genes"] if 0 <= i < len(genes)]
        return {"fold": self.fold, "train": list(self.train), "test": list(self.test), "n_genes": len(genes),
                "metrics": metrics}

    def brief(self) -> dict[str, Any]:
        """The fold's entry in the run's ``metrics.json``: pooled metrics, per-gene PCC and map PCC per method."""
        return {"fold": self.fold, **{m: {"pooled": r["pooled"], "per_gene_pcc": r["per_gene"]["pcc"],
                                          **({"map_pcc": r["maps"]["pcc"]} if "maps" in r else {})}
                                      for m, r in self.metrics.items()}}


@dataclass(frozen=True)
class MethodSummary:
    """One method over the folds.

    Attributes:
        summary: `hist_st.metrics.summarise_folds` record (both protocols: mean, std, values per fold).
        seconds: Train + predict wall time over the folds (as recorded when a fold came from the cache).
        reused_from: The run folder that computed every fold, when all were taken from one other folder.
    """

    summary: Mapping[str, Any]
    seconds: float
    reused_from: str | None = None


@dataclass(frozen=True)
class CVResult:
    """A cross-validation run; on ranks other than 0 of a distributed job the same type with no methods or folds.

    Attributes:
        out_dir: The run folder.
        embedding: The embedding every method read.
        genes: The one gene list (scope ``dataset``), else None.
        methods: Label -> `MethodSummary`, in the order the methods were given.
        folds: One `FoldRecord` per fold.
        histories: ``"fold <i>"`` -> per-epoch training records (methods that keep them: HiST).
        k, group_by: Number of folds and their group column.
    """

    out_dir: Path
    embedding: str
    genes: tuple[str, ...] | None
    methods: Mapping[str, MethodSummary] = field(default_factory=dict)
    folds: tuple[FoldRecord, ...] = ()
    histories: Mapping[str, list[dict[str, float]]] = field(default_factory=dict)
    k: int = 0
    group_by: str | None = None

    def summaries(self) -> dict[str, Any]:
        """Label -> `summarise_folds` record."""
        return {m: s.summary for m, s in self.methods.items()}

    @property
    def table(self) -> str:
        """The Markdown comparison table (`hist_st.metrics.format_table`); empty without methods."""
        return format_table(self.summaries()) if self.methods else ""

    def to_json(self) -> dict[str, Any]:
        """The content of the run's ``metrics.json``."""
        return {"methods": self.summaries(), "folds": [f.brief() for f in self.folds],
                "seconds": {m: s.seconds for m, s in self.methods.items()}, "embedding": self.embedding,
                "group_by": self.group_by, "k": self.k, "n_genes": len(self.genes) if self.genes else None}
