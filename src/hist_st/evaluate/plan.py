"""What every method of an experiment shares, computed once: the slides, the folds and the genes.

The folds come from `hist_st.train.folds.make_folds` (by slide, or by a group column such as ``patient``)
or from a saved ``splits.json``; the genes from the cohort manifest's ranking (scope ``dataset``: one list
for every fold) or from each fold's training slides (scope ``train-only``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hist_st.cohort import read_manifest
from hist_st.errors import InputError
from hist_st.slide import Slide
from hist_st.train.config import GeneConfig
from hist_st.train.data import embedding_key, load_slides, select_genes
from hist_st.train.folds import make_folds
from hist_st.train.splits import check_folds, read_splits

__all__ = ["Plan", "make_plan", "slide_groups"]


@dataclass(frozen=True, eq=False)
class Plan:
    """The inputs every method of a cross-validation shares.

    Attributes:
        cohort: The prepared cohort folder.
        slides: Slide id -> `Slide`, every slide of the run.
        folds: ``[{"fold", "train", "test"}]``, ids sorted.
        genes: The one gene list of every fold (scope ``dataset`` or an explicit list), else None.
        fold_genes: Fold index -> its genes (equal to ``genes`` when that is given).
        embedding: The patch-embedding key every method reads.
        seed: The seed the folds were made with.
        group_by: The group column of the folds (None: by slide).
        split_size: The number of folds of the split when ``folds`` holds only some of them (`only`); None:
            ``folds`` is the whole split.
    """

    cohort: Path
    slides: Mapping[str, Slide]
    folds: list[dict[str, Any]]
    genes: list[str] | None
    fold_genes: Mapping[int, list[str]]
    embedding: str
    seed: int
    group_by: str | None = None
    split_size: int | None = None

    @property
    def k(self) -> int:
        """Number of folds of the split (``folds`` may hold fewer: `only`)."""
        return self.split_size or len(self.folds)

    @property
    def only_folds(self) -> list[int] | None:
        """The numbers of the folds this plan holds when it holds only some of the split (`only`), else None."""
        return [int(f["fold"]) for f in self.folds] if self.split_size else None

    def only(self, numbers: Collection[int]) -> Plan:
        """This plan with only the folds numbered ``numbers``, the split itself unchanged: one slow
        cross-validation spread over runs or machines, each training some folds, and a run without it that
        takes them from their caches (``--reuse-from``).

        Raises:
            InputError: No number, or one that is not a fold of the split.
        """
        have = [int(f["fold"]) for f in self.folds]
        if not numbers:
            raise InputError("--only-folds", f"name at least one fold (the split has folds {have})")
        if missing := sorted(set(numbers) - set(have)):
            raise InputError("--only-folds", f"no fold {missing[0]}: the split has folds {have}")
        wanted = set(numbers)
        return replace(self, folds=[f for f in self.folds if int(f["fold"]) in wanted], split_size=self.k)

    def train_slides(self, fold: Mapping[str, Any]) -> list[Slide]:
        """The fold's training slides, by sorted id."""
        return [self.slides[s] for s in sorted(fold["train"])]

    def test_slides(self, fold: Mapping[str, Any]) -> list[Slide]:
        """The fold's test slides, by sorted id."""
        return [self.slides[s] for s in sorted(fold["test"])]


def slide_groups(
    slides: Sequence[Slide], group_by: str, manifest: Mapping[str, Any] | None = None
) -> dict[str, str | None]:
    """Slide id -> group for ``group_by``: ``patient`` (the slide's patient), a manifest mapping
    (``manifest[group_by][slide_id]``), or a key of ``slide.meta``.

    A slide whose patient is unknown (blank in HEST, written as NaN) maps to None: `make_folds` gives it
    a group of its own and the folds name it. Other group columns must have a value for every slide."""
    column = manifest.get(group_by) if manifest is not None else None
    column = column if isinstance(column, Mapping) else {}
    out: dict[str, str | None] = {}
    for s in slides:
        found = (s.patient if group_by == "patient" else None, column.get(s.slide_id), s.meta.get(group_by))
        value = next((v for v in found if v is not None), None)
        if value is None or value == "" or (isinstance(value, float) and value != value):
            if group_by != "patient":
                raise InputError(f"slide {s.slide_id!r}", f"has no value for the group column {group_by!r}")
            value = None
        out[s.slide_id] = None if value is None else str(value)
    return out


def make_plan(
    cohort: str | Path, genes: GeneConfig, *, k: int = 4, seed: int = 0, group_by: str | None = None,
    folds: str | Path | Sequence[Mapping[str, Sequence[str]]] | None = None,
    slide_ids: Sequence[str] | None = None, embedding: str | None = None,
) -> Plan:
    """Load a cohort and plan its cross-validation.

    Args:
        cohort: Folder of prepared slides (+ optional ``cohort.json``).
        genes: Which genes (`GeneConfig`; scope ``dataset`` picks them once from the manifest ranking).
        k: Number of folds (ignored when ``folds`` is given).
        seed: Seed of the folds.
        group_by: None (folds by slide, the paper) or a group column such as ``patient``.
        folds: Explicit folds (a ``splits.json`` or a list of ``{"train", "test"}``) instead of making them.
        slide_ids: Restrict the cohort to these slides.
        embedding: Embedding key; None: the only one every slide has (`hist_st.train.data.embedding_key`).

    Returns:
        The `Plan`: slides, folds, genes (per fold too) and embedding key.

    Raises:
        InputError: Unreadable slides or manifest, bad folds or group column, missing genes.
    """
    slides = load_slides(cohort, slide_ids)
    by_id = {s.slide_id: s for s in slides}
    manifest = read_manifest(cohort)
    ids = sorted(by_id)
    if folds is None:
        groups = slide_groups(slides, group_by, manifest) if group_by else None
        fold_list = make_folds(ids, k, seed, groups)
    elif isinstance(folds, (str, Path)):
        fold_list = read_splits(folds, ids)
    else:
        fold_list = check_folds(list(folds), ids)
    emb = embedding_key(slides, embedding)
    dataset_genes = select_genes(slides, genes, manifest) if genes.scope == "dataset" or genes.genes else None
    fold_genes = {int(f["fold"]): dataset_genes if dataset_genes is not None
                  else select_genes([by_id[s] for s in sorted(f["train"])], genes, None) for f in fold_list}
    return Plan(cohort=Path(cohort), slides=by_id, folds=fold_list, genes=dataset_genes, fold_genes=fold_genes,
                embedding=emb, seed=int(seed), group_by=group_by)
