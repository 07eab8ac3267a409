"""Training configuration: frozen dataclasses, YAML loading and ``key=value`` overrides.

One `TrainConfig` is handed to every part of training (`hist_st.train.loop.train`, cross-validation,
the checkpoint). Defaults are the paper's (SPEC section 2): 100 epochs, AdamW lr 1e-4, weight decay
1e-4, cosine annealing to 0, one slide per step, coordinate augmentation with a cosine strength schedule.

Example:
    >>> cfg = load_config(None, ["epochs=5", "model.dim=32", "augment.variant=authors"])
    >>> cfg.model.dim
    32
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from hist_st.cohort import GeneSet
from hist_st.errors import InputError
from hist_st.model.config import HiSTConfig, renamed_keys
from hist_st.model.hist import GRAD_CHECKPOINTING
from hist_st.slide import atomic_write

__all__ = [
    "AugmentConfig",
    "GeneConfig",
    "TrainConfig",
    "default_model_config",
    "load_config",
    "config_to_dict",
    "config_from_dict",
    "apply_overrides",
    "parse_override",
    "parse_overrides",
    "with_gene_set",
    "run_config",
    "save_config",
]


@dataclass(frozen=True)
class AugmentConfig:
    """Coordinate-only augmentation (SPEC 2), applied to continuous lattice-unit coordinates.

    ``variant="paper"`` (default): mirror (each axis with p = 0.5), shear up to ``shear_deg`` degrees,
    rotation by a random right angle plus up to ``rotate_deg`` degrees, spot dropout with base probability
    ``dropout``; a cosine strength schedule decays from ``strength_start`` to ``strength_end`` over
    training and scales the dropout probability and each geometric transform's probability
    (``schedule_probability``; with ``schedule_geometry`` also the shear and rotation magnitudes).

    ``variant="authors"``: the authors' released code: each transform applied with probability
    ``p_transform`` = 0.75, shear factor uniform in +-tan(30 deg), rotation uniform in [0, 360), keep 25%
    of the spots (dropout 0.75) scaled by the same schedule. Their schedule never reached the DataLoader
    workers, so 75% dropout lasted the whole run; ``schedule="constant"`` reproduces that behaviour.

    The three schedules of issue 16 (paper text A.7: "coordinate augmentations with a cosine strength
    schedule that decays from 1.0 to 0.2 ... spot dropout with base probability 0.2 (scaled by the same
    schedule)"):

    - paper (default): ``variant=paper schedule=cosine schedule_probability=true``;
    - authors' intended: ``variant=authors schedule=cosine schedule_probability=true``;
    - authors' effective (what their code ran): ``variant=authors schedule=constant``;
    - hist-st before issue 16: ``schedule_probability=false`` (only the dropout follows the schedule).

    Attributes:
        enabled: Apply augmentation at all (the "no coordinate augmentation" ablation sets False).
        variant: ``"paper"`` or ``"authors"``; fills the fields left at None below.
        schedule: ``"cosine"`` (strength decays) or ``"constant"`` (strength stays ``strength_start``).
        strength_start: Strength at epoch 0.
        strength_end: Strength at the last epoch.
        mirror: Enable random mirroring.
        shear: Enable random shear.
        rotate: Enable random rotation.
        shear_deg: Maximum shear angle (degrees); None = variant default (15 paper, 30 authors).
        rotate_deg: Max deviation from a right angle (degrees); None = variant default (30 paper; the
            authors' variant rotates uniformly and ignores it).
        dropout: Base spot-dropout probability; None = variant default (0.2 paper, 0.75 authors).
        p_transform: Probability of applying each geometric transform; None = variant default (1.0 paper,
            0.75 authors).
        schedule_probability: Scale each geometric transform's probability (``p_transform``) by the
            strength, as the dropout probability is (paper text; the authors' code's mechanism).
        schedule_geometry: Also scale shear and rotation-deviation magnitudes by the strength.
        min_spots: Never drop below this many spots (small slides keep enough support).
    """

    enabled: bool = True
    variant: str = "paper"
    schedule: str = "cosine"
    strength_start: float = 1.0
    strength_end: float = 0.2
    mirror: bool = True
    shear: bool = True
    rotate: bool = True
    shear_deg: float | None = None
    rotate_deg: float | None = None
    dropout: float | None = None
    p_transform: float | None = None
    schedule_probability: bool = True
    schedule_geometry: bool = False
    min_spots: int = 16

    def __post_init__(self) -> None:
        if self.variant not in ("paper", "authors"):
            raise InputError("config", f"augment.variant must be 'paper' or 'authors', got {self.variant!r}")
        if self.schedule not in ("cosine", "constant"):
            raise InputError("config", f"augment.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        for name in ("dropout", "p_transform"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise InputError("config", f"augment.{name} must lie in [0, 1], got {v}")
        for name in ("strength_start", "strength_end"):
            _check_range(f"augment.{name}", getattr(self, name), 0.0, 1.0)
        if self.shear_deg is not None:
            _check_range("augment.shear_deg", self.shear_deg, 0.0, 89.0)
        if self.rotate_deg is not None:
            _check_range("augment.rotate_deg", self.rotate_deg, 0.0, 180.0)
        if self.min_spots < 1:
            raise InputError("config", f"augment.min_spots must be >= 1, got {self.min_spots}")

    def resolved(self) -> AugmentConfig:
        """A copy with every None field replaced by the variant's default."""
        if self.variant == "paper":
            d = {"shear_deg": 15.0, "rotate_deg": 30.0, "dropout": 0.2, "p_transform": 1.0}
        else:
            d = {"shear_deg": 30.0, "rotate_deg": 180.0, "dropout": 0.75, "p_transform": 0.75}
        return dataclasses.replace(self, **{k: v if getattr(self, k) is None else getattr(self, k) for k, v in d.items()})


@dataclass(frozen=True)
class GeneConfig:
    """Which genes are predicted.

    Attributes:
        n_top: Number of genes (the paper: 2,000 HVGs).
        ranking: ``"hvg"`` (scanpy seurat flavour on normalize_total(1e4)+log1p, by normalised
            dispersion), ``"highly_expressed"`` (mean raw count) or ``"hest-bench"`` (HEST-Benchmark's 50
            genes, `hist_st.harmonise.rank_hest_bench`; at most 50 whatever ``n_top``).
        scope: ``"dataset"`` (the ranking in the cohort's ``cohort.json``, computed over all slides, the
            paper's pipeline) or ``"train-only"`` (recomputed on the training slides of each run/fold).
        genes: An explicit gene list; overrides ranking and scope when given.
    """

    n_top: int = 2000
    ranking: str = "hvg"
    scope: str = "dataset"
    genes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.ranking not in ("hvg", "highly_expressed", "hest-bench"):
            raise InputError(
                "config", f"genes.ranking must be 'hvg', 'highly_expressed' or 'hest-bench', got {self.ranking!r}"
            )
        if self.scope not in ("dataset", "train-only"):
            raise InputError("config", f"genes.scope must be 'dataset' or 'train-only', got {self.scope!r}")
        if self.n_top < 1:
            raise InputError("config", f"genes.n_top must be >= 1, got {self.n_top}")
        if self.genes is not None:
            dup = sorted({g for g in self.genes if list(self.genes).count(g) > 1})
            if dup:
                raise InputError("config", f"genes.genes lists gene(s) more than once: {', '.join(map(str, dup[:5]))}")
            if not self.genes:
                raise InputError("config", "genes.genes is an empty list; give genes or leave it unset")

    @classmethod
    def from_spec(cls, spec: str, option: str = "--genes") -> GeneConfig:
        """A gene-set spec (`hist_st.cohort.GeneSet`: ``hvg:2000``, ``he:250``) as a dataset-scope config."""
        gs = GeneSet.parse(spec, option)
        return cls(n_top=gs.n, ranking=gs.ranking)


def default_model_config() -> Any:
    """The model's default `HiSTConfig` (paper sizes as placeholders).

    ``in_dim`` and ``n_genes`` are always overwritten from the data (embedding width, selected genes) when
    a run starts; the run directory's saved config holds the values actually used.
    """
    return HiSTConfig(in_dim=1024, n_genes=2000)


def _model_config_type() -> type:
    return HiSTConfig


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (paper defaults, SPEC section 2).

    Attributes:
        epochs: Passes over the training slides.
        lr: Peak AdamW learning rate; cosine annealing to 0 over all optimiser steps.
        weight_decay: AdamW weight decay, applied only to parameters with >= 2 dimensions.
        betas: AdamW betas.
        slides_per_step: Slides per optimiser step per process (the paper: 1).
        seed: Seeds model init, slide order, augmentation and dropout.
        embedding: Embedding key (``obsm['X_<embedding>']``); None = the only one present.
        genes: Gene selection.
        augment: Coordinate augmentation.
        model: The model's `HiSTConfig` (``in_dim``/``n_genes`` are filled from the data).
        grad_checkpointing: ``"none"``, ``"ffn"``, ``"block"`` or ``"level0"`` (whole blocks at the full
            resolution only): recompute activations in backward to save memory on large slides
            (`HiST.set_grad_checkpointing`).
        optimizer_in_backward: Update each parameter during backward as soon as its gradient is complete
            and free that gradient (`hist_st.train.optim.OptimizerInBackward`): the same parameters bit for
            bit, less peak memory; needs ``slides_per_step=1`` and one process.
        standardise_features: Standardise embeddings with the training slides' mean/std (stored with the
            model); the paper feeds raw embeddings (False).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        amp: bf16 autocast on CUDA (ignored on CPU).
        amp_cpu: bf16 autocast of the trunk on the CPU too (head and loss stay float32); pays on CPUs with
            AMX / AVX512-BF16 (`docs/results/speed.md`), off by default; on other CPUs training warns (bf16
            products run in PyTorch's reference loop there).
        num_workers: DataLoader workers building augmented lattice batches (0 = main process).
        checkpoint_every: Save a restorable checkpoint every this many epochs (and always at the end).
        progress: Show tqdm progress bars.
        threads: torch CPU threads (0 = leave torch's default).
        supervise: Where the labels are: ``"spot"`` (each spot's own counts, the paper) or ``"coarse<k>"``
            (super-resolution training, `hist_st.train.coarse`: labels on ``k x k`` blocks of spots, counts
            summed; the model still predicts every spot).
    """

    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    slides_per_step: int = 1
    seed: int = 0
    embedding: str | None = None
    genes: GeneConfig = field(default_factory=GeneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: Any = field(default_factory=default_model_config)
    grad_checkpointing: str = "none"
    optimizer_in_backward: bool = False
    standardise_features: bool = False
    device: str = "auto"
    amp: bool = True
    amp_cpu: bool = False
    num_workers: int = 0
    checkpoint_every: int = 10
    progress: bool = True
    threads: int = 0
    supervise: str = "spot"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError("config", f"epochs must be >= 1, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError("config", f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError("config", f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise InputError("config", f"betas[{i}] must lie in [0, 1), got {b}")
        for name in ("seed", "num_workers", "threads"):
            if getattr(self, name) < 0:
                raise InputError("config", f"{name} must be >= 0, got {getattr(self, name)}")
        if self.slides_per_step < 1:
            raise InputError("config", f"slides_per_step must be >= 1, got {self.slides_per_step}")
        if self.checkpoint_every < 1:
            raise InputError("config", f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.grad_checkpointing not in GRAD_CHECKPOINTING:
            raise InputError("config", f"grad_checkpointing must be {', '.join(GRAD_CHECKPOINTING[:-1])} or "
                             f"{GRAD_CHECKPOINTING[-1]}, got {self.grad_checkpointing!r}")
        if self.optimizer_in_backward and self.slides_per_step > 1:
            raise InputError("config", f"optimizer_in_backward=true updates the parameters during each slide's "
                             f"backward, so it cannot accumulate gradients over slides_per_step="
                             f"{self.slides_per_step} slides; set slides_per_step=1 or optimizer_in_backward=false")
        block_factor(self.supervise)  # raises InputError naming the accepted values


SUPERVISE_HELP = (
    "'spot' (labels on the slide's own spots) or 'coarse<k>', k >= 2 (labels on k x k blocks of neighbouring "
    "spots, counts summed; the model still predicts every spot)"
)


def block_factor(supervise: str) -> int:
    """Block side ``k`` of a ``supervise`` mode: 1 for ``"spot"``, ``k`` for ``"coarse<k>"``.

    Raises:
        InputError: Any other value (names the option ``supervise``).
    """
    if supervise == "spot":
        return 1
    m = re.fullmatch(r"coarse(\d+)", str(supervise))
    if m is None or int(m.group(1)) < 2:
        raise InputError("config", f"supervise must be {SUPERVISE_HELP}; got {supervise!r}")
    return int(m.group(1))


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # also refuses NaN
        raise InputError("config", f"{key} must lie in [{low:g}, {high:g}], got {value}")


# ----------------------------------------------------------------------------------------------------
# dict <-> dataclass, YAML, overrides


def config_to_dict(cfg: Any) -> Any:
    """Recursively convert (nested, frozen) dataclasses to plain dicts/lists of primitives."""
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    return cfg


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolved forward references: fall back to raw annotations
        return {f.name: f.type for f in fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` (dataclasses, tuples, optionals, primitives)."""
    if tp is Any or tp is None:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (TypeError, ValueError, InputError):
                continue
        raise InputError("config", f"{where}: cannot interpret {value!r} as {tp}")
    if is_dataclass(tp):
        if is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise InputError("config", f"{where}: expected a mapping, got {value!r}")
        if tp is _model_config_type():  # partial sections start from the default architecture; old key names
            value = {**config_to_dict(default_model_config()), **renamed_keys(value)}
        return _from_dict(tp, value, where)
    if origin is tuple:
        if value is None:
            raise InputError("config", f"{where}: expected a list, got None")
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise InputError("config", f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if args and len(args) != len(value):
            raise InputError("config", f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args or [Any] * len(value)))
    if origin in (list, typing.List):  # noqa: UP006
        if not isinstance(value, (list, tuple)):
            raise InputError("config", f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise InputError("config", f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise InputError("config", f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise InputError("config", f"{where}: expected an integer, got {value!r}") from exc
    if tp is float:
        if isinstance(value, bool):
            raise InputError("config", f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise InputError("config", f"{where}: expected a number, got {value!r}") from exc
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise InputError("config", f"{where}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and tp.__module__ == "typing":
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        try:
            return tp(value)
        except Exception as exc:  # noqa: BLE001
            raise InputError("config", f"{where}: cannot interpret {value!r} as {tp.__name__}") from exc
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    valid = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise InputError(
            "config", f"unknown key(s) {', '.join((where + '.' if where else '') + u for u in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(valid))}"
        )
    hints = _field_types(cls)
    if cls is TrainConfig:
        hints["model"] = _model_config_type()
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints.get(name, Any), f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError("config", f"{where or cls.__name__}: {exc}") from exc


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a `TrainConfig` from a (possibly partial) nested dict; missing keys take defaults.

    Raises:
        InputError: On unknown keys or values of the wrong type, naming the key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("config", f"expected a mapping at the top level, got {type(data).__name__}")
    return _from_dict(TrainConfig, data)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise InputError("config", f"override {dotted!r}: {k!r} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


#: A number in exponent notation without a dot, e.g. ``1e-4`` (a string to YAML 1.1).
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(item: str, option: str = "config", example: str = "epochs=10") -> tuple[str, Any]:
    """One ``key.sub=value`` item -> ``("key.sub", value)``, the value parsed as YAML (empty: None).

    Exponent literals without a dot (``1e-4``), which YAML 1.1 reads as strings, are numbers here.

    The one parser of ``key=value`` items: HiST config overrides, ``--baseline-option``, ``bench speed
    --model``.

    Args:
        item: The item as typed.
        option: The option or file it came from, named in errors.
        example: A well-formed item, shown in errors.

    Raises:
        InputError: No ``=``, an empty key or key part (``a..b``, ``.a``), or a value that is not YAML.
    """
    key, sep, raw = str(item).partition("=")
    key = key.strip()
    if not sep:
        raise InputError(option, f"{item!r} is not of the form key=value (e.g. {example})")
    if not key or not all(part.strip() for part in key.split(".")):
        raise InputError(option, f"{item!r} has an empty key or key part (e.g. {example})")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as exc:
        raise InputError(option, f"{item!r}: cannot parse the value ({exc})") from exc
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)
    return ".".join(part.strip() for part in key.split(".")), value


def parse_overrides(
    items: Sequence[str] | None, option: str = "config", example: str = "epochs=10"
) -> dict[str, Any]:
    """`parse_override` of every item: ``{"key.sub": value}``, a later item winning over an earlier one."""
    return dict(parse_override(item, option, example) for item in items or ())


#: Override keys of the gene set, spelled ``--genes RANKING:N`` on every command instead.
_GENE_SET_KEYS = ("genes.n_top", "genes.ranking")


def with_gene_set(overrides: Sequence[str], genes: str | None = None) -> list[str]:
    """The user's ``key=value`` overrides followed by those of the gene-set spec ``genes`` (if given).

    The gene set has one spelling on every command, ``--genes hvg:2000`` / ``--genes he:250``; the old
    ``genes.n_top=N`` / ``genes.ranking=R`` overrides are refused with the new spelling (saved configs and
    `load_config` still hold and read ``genes.n_top``).

    Raises:
        InputError: A ``genes.n_top`` or ``genes.ranking`` override; a bad spec.
    """
    given = parse_overrides(overrides)
    old = {k: v for k, v in given.items() if k in _GENE_SET_KEYS}
    if old:
        ranking = {"highly_expressed": "he"}.get(str(old.get("genes.ranking", "hvg")), old.get("genes.ranking", "hvg"))
        n = old.get("genes.n_top", 2000)
        typed = " ".join(f"{k}={v}" for k, v in old.items())
        raise InputError(typed, f"the gene set is spelled --genes RANKING:N on every command: use --genes {ranking}:{n}")
    out = list(overrides)
    if genes is not None:
        gs = GeneSet.parse(genes)
        out += [f"genes.n_top={gs.n}", f"genes.ranking={gs.ranking}"]
    return out


#: Override keys that were renamed -> what to type instead (configs saved with the old key still load).
RENAMED = {
    "model.window": "renamed model.half_window: it is the window half-size w (windows of 2w x 2w lattice "
    "sites; the default 3 gives 6 x 6 windows); use model.half_window=3",
}


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (`parse_override`) to a nested dict, in place, and return it."""
    for item in overrides or ():
        key, value = parse_override(item)
        if key in RENAMED:
            raise InputError(key, RENAMED[key])
        _set_path(data, key, value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a `TrainConfig` from a YAML file (or defaults when None) and apply ``key=value`` overrides.

    Args:
        path: YAML file with any subset of the `TrainConfig` keys (nested sections as mappings).
        overrides: ``["epochs=10", "model.dim=64", "augment.variant=authors"]``.

    Returns:
        The resolved frozen `TrainConfig`.

    Raises:
        InputError: Missing/unreadable file, unknown keys, badly typed values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(p, "config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise InputError(p, f"not valid YAML ({exc})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(p, "the config must be a YAML mapping of keys to values")
        data = loaded
    apply_overrides(data, list(overrides))
    return config_from_dict(data)


def run_config(
    config: str | Path | None = None, overrides: Sequence[str] = (), *, base: Mapping[str, Any] | None = None
) -> TrainConfig:
    """The config of a run: ``base`` (a resumed checkpoint's config) or the defaults, then the YAML file
    ``config``, then the ``key=value`` ``overrides``.

    On resume only the keys the user gives change the checkpoint's config, so a resumed run compares
    exactly what the user asked for (`hist_st.train.resume`).

    Raises:
        InputError: An unreadable file, unknown keys, badly typed values.
    """
    if base is None:
        return load_config(config, list(overrides))
    data = dict(base)
    if config is not None:
        load_config(config)  # validates the file, naming it
        _merge(data, yaml.safe_load(Path(config).read_text()) or {})
    return config_from_dict(apply_overrides(data, list(overrides)))


def _merge(base: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-update ``base`` with ``given`` (nested mappings merged key by key), in place."""
    for k, v in given.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _merge(dict(base[k]), v)
        else:
            base[k] = v
    return base


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); `load_config` reads it back to an equal config."""

    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return Path(path)
