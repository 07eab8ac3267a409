"""The one interface every baseline implements, its registry, and the helpers they share.

Every baseline is trained and evaluated exactly like HiST: on the same slides, the same genes (picked by
name from each slide's own gene order), the same targets (``log1p`` of raw counts, no library-size
normalisation; SPEC 2) and the same patch embeddings (``slide.embeddings[embedding_key]``).
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from hist_st.errors import InputError
from hist_st.runtime import resolve_device, seed_everything
from hist_st.slide import Slide

__all__ = ["Method", "register", "variant", "options_of", "get_method", "method_option_names", "list_methods",
           "check_methods", "log1p_targets", "slide_embeddings"]

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``cls`` available as ``get_method(name)``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"baseline {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def variant(**defaults: Any) -> Callable[[type[Method]], type[Method]]:
    """Class decorator for a labelled variant of the parent method: the same options, ``defaults`` bound
    (`functools.partialmethod`; ``@variant(min_std=1e-3)`` on a `RidgeBaseline` subclass: ridge-robust)."""

    def deco(cls: type[Method]) -> type[Method]:
        parent = cls.__mro__[1]
        unknown = sorted(set(defaults) - set(inspect.signature(parent.__init__).parameters))
        if unknown:
            raise TypeError(f"{cls.__name__}: {parent.__name__} has no option(s) {unknown}")
        cls.__init__ = functools.partialmethod(parent.__init__, **defaults)  # type: ignore[assignment]
        return cls

    return deco


def options_of(local_vars: dict[str, Any]) -> dict[str, Any]:
    """A method's options from ``locals()`` taken on the first line of its ``__init__`` (its arguments in
    signature order), to pass on to `Method.__init__`."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "__class__")}


def list_methods() -> list[str]:
    """Names accepted by `get_method`, sorted."""
    return sorted(_REGISTRY)


def check_methods(methods: Sequence[str], option: str = "--methods") -> list[str]:
    """Method names as given by a user (case and spaces ignored, repeats dropped), each checked.

    Raises:
        InputError: An unknown name (naming ``option`` and the known ones), or no name at all.
    """
    names = list(dict.fromkeys(m.strip().lower() for m in map(str, methods) if m.strip()))
    unknown = [m for m in names if m not in _REGISTRY]
    if unknown:
        raise InputError(option, f"unknown method {unknown[0]!r}; choose from {', '.join(list_methods())}")
    if not names:
        raise InputError(option, "no method given")
    return names


def get_method(name: str, **options: Any) -> Method:
    """Build the baseline registered as ``name`` with its published defaults overridden by ``options``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or unknown option.
    """
    return _method_class(name)(**options)


def method_option_names(name: str) -> set[str]:
    """The keyword options the baseline registered as ``name`` takes (e.g. whether it has ``epochs``)."""
    return {k for k in inspect.signature(_method_class(name).__init__).parameters if k != "self"}


def _method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(list_methods())}") from None


def log1p_targets(slide: Slide, genes: Sequence[str]) -> np.ndarray:
    """The training target of every method: ``log1p`` of the slide's raw counts of ``genes``.

    Args:
        slide: A slide with counts.
        genes: Gene symbols, looked up by name in ``slide.genes`` (the slide's own column order is ignored).

    Returns:
        float32 ``[N, G]``, columns in ``genes`` order.
    """
    if slide.counts is None:
        raise InputError(f"slide {slide.slide_id!r}", "has no counts; a training slide needs expression")
    index = {str(g): i for i, g in enumerate(slide.genes)}
    missing = [g for g in genes if str(g) not in index]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"slide {slide.slide_id!r}", f"{len(missing)} selected gene(s) are absent: {shown}")
    counts = slide.counts[:, [index[str(g)] for g in genes]]
    dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    return np.log1p(np.asarray(dense, dtype=np.float64)).astype(np.float32)


def slide_embeddings(slide: Slide, key: str) -> np.ndarray:
    """``slide.embeddings[key]`` as float32 ``[N, C]``; `InputError` naming the slide when absent."""
    if key not in slide.embeddings:
        have = ", ".join(sorted(slide.embeddings)) or "none"
        raise InputError(f"slide {slide.slide_id!r}", f"embedding {key!r} is missing (has: {have})")
    return np.asarray(slide.embeddings[key], dtype=np.float32)


class Method(ABC):
    """A method with the common ``fit`` / ``predict`` interface: HiST (`hist_st.methods.hist`) and every
    baseline alike.

    Subclasses take their hyper-parameters as keyword arguments whose defaults are the published ones
    (documented, with the source, in each class docstring) and pass them to ``Method.__init__``, which
    records them in `options` and sets each as an attribute of the same name (``options_of(locals())``;
    a ``device`` option becomes the `torch.device` it resolves to). What `fit` learns is set by it, in
    attributes whose names end in ``_`` (as in scikit-learn).

    Attributes:
        name: Registry name (set by `register`).
        display_name: Name in tables (default: ``name``).
        uses_embeddings: Whether the method reads ``slide.embeddings[embedding_key]``.
        uses_patches: Whether the method reads raw image patches (see `hist_st.methods.stnet`).
        distributed: Whether every rank of a ``torchrun`` job trains it together (else rank 0 alone).
        genes_: Genes fitted on, in output column order (after `fit`).
        embedding_key_: Embedding key fitted on (after `fit`).
        out_dir_: The folder `fit` may write its run into (None: nothing written).
    """

    name: ClassVar[str] = "method"
    display_name: ClassVar[str | None] = None
    uses_embeddings: ClassVar[bool] = True
    uses_patches: ClassVar[bool] = False
    distributed: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = dict(options)
        vars(self).update(options)
        if "device" in options:  # the neural baselines: "auto" is CUDA when available, as for HiST
            self.device = resolve_device(options["device"])

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"

    @property
    def label(self) -> str:
        """The method's name in tables."""
        return self.display_name or self.name

    def save_settings(self, out_dir: Path) -> None:
        """Write what defines this method's runs into a cross-validation folder (HiST: its config); the
        baselines' options are recorded by the experiments."""
        return None

    def fit(
        self, train_slides: Sequence[Slide], genes: Sequence[str], embedding_key: str, seed: int = 0, *,
        out_dir: str | Path | None = None,
    ) -> Method:
        """Train on ``train_slides``.

        Args:
            train_slides: Training slides (with counts; with ``embeddings[embedding_key]`` where used).
            genes: Target genes, picked by name from every slide.
            embedding_key: Which patch embedding to use.
            seed: Seeds every random choice of the fit.
            out_dir: A folder the method may write its run into (HiST: model, config, history).

        Returns:
            ``self``.
        """
        if len(train_slides) == 0:
            raise ValueError("fit needs at least one training slide")
        if len(genes) == 0:
            raise ValueError("fit needs at least one gene")
        self.genes_: list[str] = [str(g) for g in genes]
        self.embedding_key_ = embedding_key
        self.history_: list[Any] = []  # training loss per epoch (or step), for the methods that have one
        self.out_dir_ = Path(out_dir) if out_dir is not None else None
        rng = seed_everything(seed)
        self._fit(list(train_slides), rng, seed)
        return self

    def predict(self, slide: Slide) -> np.ndarray:
        """Predict ``log1p`` expression of the fitted genes at every spot of ``slide``.

        Returns:
            float32 ``[N, G]``, columns in the order of the ``genes`` given to `fit`.
        """
        if not hasattr(self, "genes_"):
            raise RuntimeError(f"{type(self).__name__}.predict called before fit")
        out = np.asarray(self._predict(slide), dtype=np.float32)
        expected = (slide.n_spots, len(self.genes_))
        if out.shape != expected:  # pragma: no cover - guards subclass bugs
            raise RuntimeError(f"{self.name} predicted shape {out.shape}, expected {expected}")
        return out

    @abstractmethod
    def _fit(self, slides: list[Slide], rng: np.random.Generator, seed: int) -> None: ...

    @abstractmethod
    def _predict(self, slide: Slide) -> np.ndarray: ...

    def _xy(self, slides: Sequence[Slide]) -> tuple[np.ndarray, np.ndarray]:
        """Stack embeddings ``[sum N, C]`` and log1p targets ``[sum N, G]`` of ``slides``."""
        x = np.concatenate([self._x(s) for s in slides], axis=0)
        y = np.concatenate([log1p_targets(s, self.genes_) for s in slides], axis=0)
        return x, y

    def _x(self, slide: Slide) -> np.ndarray:
        return slide_embeddings(slide, self.embedding_key_)
