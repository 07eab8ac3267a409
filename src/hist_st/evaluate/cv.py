"""K-fold cross-validation of any methods on one plan: identical folds, genes, targets and embedding.

Run directory layout::

    config.yaml            HiST's resolved TrainConfig (when HiST is among the methods)
    splits.json            the exact folds (and k, seed, group_by)
    genes.txt              genes (scope 'dataset'); per fold under fold_<i>/genes.txt for 'train-only'
    versions.json          package versions
    fold_<i>/              HiST's model.pt, history.json, config.yaml, genes.txt
    fold_<i>/predictions/  <slide_id>.h5ad prediction files (X = predicted counts, layers['log1p'], measured counts)
    fold_<i>/metrics.json  per-method fold metrics (both protocols, per slide, per gene)
    cache/<key>.json       one entry per (method, fold): its metrics, seconds and where it was computed
                           (`hist_st.evaluate.cache`; a later run with the same key reuses it)
    metrics.json           per-method summaries over folds (mean, std, values) + per-fold numbers
    table.md               Table-2 style comparison, both protocols labelled
    loss_curves.png        HiST's training loss per epoch, one line per fold

HiST is evaluated at the final epoch (no model selection on test slides).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hist_st.errors import InputError
from hist_st.evaluate.cache import ResultCache, digest, fold_key, slide_fingerprint, write_entry
from hist_st.evaluate.plan import Plan, make_plan
from hist_st.evaluate.results import CVResult, FoldRecord, MethodSummary
from hist_st.jsonio import write_json
from hist_st.methods.base import Method, get_method, list_methods
from hist_st.methods.hist import HiSTMethod
from hist_st.metrics import evaluate_fold, map_metrics, summarise_folds
from hist_st.outputs import fresh_folder
from hist_st.pl import pyplot
from hist_st.runtime import package_versions
from hist_st.slide import atomic_write, read_prepared, write_prepared
from hist_st.train.checkpoint import ModelBundle, load_bundle
from hist_st.train.config import TrainConfig
from hist_st.train.data import gene_counts
from hist_st.train.distributed import DistInfo, init_distributed
from hist_st.train.folds import save_folds

__all__ = ["run_cv", "build_methods", "cross_validate", "fold_model", "plot_loss_curves", "PROTOCOLS"]

#: The note above every table: what the two metric protocols are.
PROTOCOLS = ("Protocols: pooled = per-slide flattened N x G counts, averaged over test slides (HiST authors' "
             "metric); per-gene = log1p Pearson/R2 per gene over all test spots (HEST metric).")


def fold_model(run_dir: str | Path, fold: int) -> ModelBundle:
    """HiST's trained model of fold ``fold`` of a `run_cv` folder (``fold_<i>/model.pt``).

    Raises:
        InputError: The fold has no model (the run had no HiST) or an unreadable one.
    """
    path = Path(run_dir) / f"fold_{fold}" / "model.pt"
    if not path.is_file():
        raise InputError(path, "fold model not found (was the run made with HiST?)")
    return load_bundle(path)


def plot_loss_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Training loss per epoch, one line per fold (log-scale y)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, hist in histories.items():
        if hist:
            ax.plot([h["epoch"] for h in hist], [h["loss"] for h in hist], label=name, lw=1.5)
    ax.set(xlabel="epoch", ylabel="training MSE (log1p counts)", yscale="log",
           title="HiST training loss per fold")
    ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs on the x axis
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_cv(
    plan: Plan, methods: Sequence[Method], out_dir: str | Path, *, seed: int = 0,
    write_predictions: bool = True, mc_samples: int = 0, dist_info: DistInfo | None = None,
    progress: bool = True, cache: ResultCache | None = None, retrain: Collection[str] = (),
) -> CVResult:
    """Cross-validate ``methods`` on the folds and genes of ``plan``.

    Args:
        plan: Slides, folds, genes and embedding (`hist_st.evaluate.make_plan`).
        methods: Unfitted methods, each trained once per fold (in this order) on the fold's training slides.
        out_dir: Run directory (layout in the module docstring); a failed run removes a folder it created.
        seed: Every method's training seed.
        write_predictions: Write the test predictions of the methods that make prediction files (HiST).
        mc_samples: MC-dropout passes for those files' ``predicted_std`` (0: none).
        dist_info: This process's place in a ``torchrun`` job: every rank trains the `Method.distributed`
            methods together; rank 0 alone trains the others, predicts, scores and writes.
        progress: Show a progress bar over folds.
        cache: Take a (method, fold) from ``out_dir/cache`` or ``cache.extra`` instead of training it when
            its key matches (`hist_st.evaluate.cache`; a method that writes prediction files only when they
            are already in ``out_dir``). None: train everything. Every result is stored in ``out_dir/cache``.
        retrain: Labels of methods trained even when cached.

    Returns:
        The `CVResult` (per method: fold summary, seconds, the folder that computed it when every fold came
        from another run folder; per fold: the metrics); on ranks other than 0 one without methods or folds.
    """
    master = (dist_info or DistInfo()).is_master
    out = Path(out_dir)
    labels = [m.label for m in methods]
    keys, hits, copies = _cache_lookups(plan, methods, out, seed=seed, cache=cache, retrain=retrain,
                                        need_files=write_predictions)
    done: dict[str, list[dict[str, Any]]] = {m: [] for m in labels}  # per method, its folds' cache entries
    with fresh_folder(out, enabled=master):
        if master:
            only = {"only_folds": plan.only_folds} if plan.only_folds else {}
            save_folds(plan.folds, out / "splits.json", k=plan.k, seed=plan.seed, group_by=plan.group_by,
                       slides_dir=str(plan.cohort), **only)
            if plan.genes is not None:
                (out / "genes.txt").write_text("\n".join(plan.genes) + "\n")
            for m in methods:
                m.save_settings(out)
            write_json(package_versions(), out / "versions.json")
        histories: dict[str, list[dict[str, float]]] = {}
        records: list[FoldRecord] = []
        bar = tqdm(plan.folds, desc="cv folds", unit="fold", disable=not (progress and master))
        for f in bar:
            i = int(f["fold"])
            for method, label in zip(methods, labels):
                entry = hits.get((i, label))
                if master:
                    for src, dst in copies.get((i, label), ()):
                        with atomic_write(dst) as tmp:
                            shutil.copyfile(src, tmp)
                if entry is None and (master or method.distributed):
                    entry = _fit_fold(plan, f, method, out, seed=seed, master=master,
                                      write_predictions=write_predictions, mc_samples=mc_samples)
                if entry is None:  # rank 0 alone trains this method, or this rank only helped train it
                    continue
                if master and "maps" not in entry["metrics"] and hasattr(method, "prediction"):
                    entry = _with_maps(entry, plan, f, out)  # written before the maps protocol
                done[label].append(entry)
                if entry.get("history"):
                    histories[f"fold {i}"] = entry["history"]
                if master:  # every result is stored here; a copy keeps the folder that computed it
                    write_entry(out, keys[i, label], {k: v for k, v in entry.items() if k != "key"})
            if not master:
                continue
            record = FoldRecord(i, tuple(f["train"]), tuple(f["test"]), tuple(plan.fold_genes[i]),
                                {m: done[m][-1]["metrics"] for m in labels})
            write_json(record.to_json(), out / f"fold_{i}" / "metrics.json")
            records.append(record)
            if hasattr(bar, "set_postfix") and labels:
                first = record.metrics[labels[0]]
                bar.set_postfix(pooled_r2=f"{first['pooled']['r2']:.3f}", pcc=f"{first['per_gene']['pcc']:.3f}")

        genes_ = tuple(plan.genes) if plan.genes is not None else None
        if not master:
            return CVResult(out, plan.embedding, genes_, k=plan.k, group_by=plan.group_by)
        here = out.resolve()
        origins = {m: {Path(x["origin"]).resolve() for x in e} for m, e in done.items()}
        reused = {m: e[0]["origin"] for m, e in done.items()  # every fold computed in one other folder
                  if len(origins[m]) == 1 and here not in origins[m]}
        result = CVResult(out, plan.embedding, genes_, k=plan.k, group_by=plan.group_by, folds=tuple(records),
                          histories=histories,
                          methods={m: MethodSummary(summarise_folds([r.metrics[m] for r in records]),
                                                    sum(e["seconds"] for e in done[m]), reused.get(m))
                                   for m in labels})
        write_json(result.to_json(), out / "metrics.json")
        over = f"folds {', '.join(map(str, plan.only_folds))} of {plan.k}" if plan.only_folds else f"{plan.k} folds"
        (out / "table.md").write_text(f"{PROTOCOLS} Mean ± std over {over}.\n\n" + result.table + "\n")
        if histories:
            plot_loss_curves(histories, out / "loss_curves.png")
        return result


def _fit_fold(
    plan: Plan, fold: Mapping[str, Any], method: Method, out: Path, *, seed: int, master: bool,
    write_predictions: bool, mc_samples: int,
) -> dict[str, Any] | None:
    """Train ``method`` on the fold (run folder ``out/fold_<i>``), predict and score its test slides: the
    fold's cache entry (metrics, seconds, per-epoch history, origin); None on ranks other than 0."""
    i = int(fold["fold"])
    fdir, genes, test = out / f"fold_{i}", plan.fold_genes[i], plan.test_slides(fold)
    t0 = time.perf_counter()
    method.fit(plan.train_slides(fold), genes, embedding_key=plan.embedding, seed=seed, out_dir=fdir)
    if not master:
        return None
    preds = {s.slide_id: method.predict(s) for s in test}
    if write_predictions and hasattr(method, "prediction"):
        for s in test:
            write_prepared(method.prediction(s, mc_samples=mc_samples, seed=seed), out / prediction_file(i, s.slide_id))
    seconds = time.perf_counter() - t0
    history = method.history_ if method.history_ and isinstance(method.history_[0], Mapping) else []  # HiST
    metrics = evaluate_fold(preds, {s.slide_id: gene_counts(s, genes) for s in test})
    return {"method": method.label, "metrics": metrics, "seconds": seconds, "history": history,
            "origin": str(out)}


def _with_maps(entry: dict[str, Any], plan: Plan, fold: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """``entry`` of a method that writes prediction files (HiST) with the maps protocol
    (`hist_st.metrics.map_metrics`) scored from the fold's prediction files in ``out``: cache entries written
    before that protocol existed. Other methods' old entries keep none (their tables show "—").

    The files hold ``relu(expm1(log1p prediction))`` in float32, the counts `map_metrics` makes of the scored
    prediction, so the score equals the one training would have recorded to float32 rounding (within 1e-4)."""
    i = int(fold["fold"])
    genes = [str(g) for g in plan.fold_genes[i]]
    paths = {s: out / prediction_file(i, s) for s in sorted(fold["test"])}
    if not all(p.is_file() for p in paths.values()):
        return entry
    per_slide = dict(entry["metrics"]["per_slide"])
    for sid, path in paths.items():
        pred = read_prepared(path)
        if [str(g) for g in pred.genes] != genes or pred.predicted is None:
            raise InputError(path, "prediction file does not hold this fold's genes; rerun with --force")
        true = gene_counts(plan.slides[sid], genes)
        per_slide[sid] = {**per_slide[sid], "map_pcc": map_metrics(np.log1p(pred.predicted), true)["pcc"]}
    maps = {"pcc": float(np.mean([per_slide[s]["map_pcc"] for s in paths]))}
    return {**entry, "metrics": {**entry["metrics"], "maps": maps, "per_slide": per_slide}}


def prediction_file(fold: int, slide_id: str) -> Path:
    """Where a run folder holds a method's prediction for a test slide of a fold (relative to the folder)."""
    return Path(f"fold_{fold}") / "predictions" / f"{slide_id}.h5ad"


def _cache_lookups(
    plan: Plan, methods: Sequence[Method], out: Path, *, seed: int, cache: ResultCache | None,
    retrain: Collection[str], need_files: bool,
) -> tuple[dict[tuple[int, str], dict[str, Any]], dict[tuple[int, str], dict[str, Any]],
           dict[tuple[int, str], list[tuple[Path, Path]]]]:
    """Every (fold, method label)'s cache key fields, the cache entries found for them, and the prediction
    files to copy with an entry found in another run folder, all looked up before anything trains (so every
    rank of a distributed job takes the same decisions).

    A method that writes prediction files (HiST) is taken from the cache only when its test slides'
    predictions are in ``out`` already or in the run folder that holds the entry (then copied); otherwise it
    trains again, so that every result folder holds the predictions its table was made from."""
    fingerprints = {s: slide_fingerprint(slide, plan.embedding) for s, slide in plan.slides.items()}
    keys, hits, copies = {}, {}, {}
    for f in plan.folds:
        i = int(f["fold"])
        for method in methods:
            key = keys[i, method.label] = fold_key(method, f, plan.fold_genes[i], embedding=plan.embedding,
                                                   seed=seed, fingerprints=fingerprints)
            if cache is None or method.label in retrain or (found := cache.find(digest(key), out)) is None:
                continue
            entry, where = found
            if need_files and hasattr(method, "prediction"):
                missing = [n for n in (prediction_file(i, s) for s in sorted(f["test"])) if not (out / n).is_file()]
                if not all((where / n).is_file() for n in missing):
                    continue
                copies[i, method.label] = [(where / n, out / n) for n in missing]
            hits[i, method.label] = entry
    return keys, hits, copies


def build_methods(
    names: Sequence[str], cfg: TrainConfig, options: Mapping[str, Mapping[str, Any]] | None = None, *,
    dist_info: DistInfo | None = None,
) -> list[Method]:
    """Unfitted methods by registry name, in order: ``hist`` is HiST with ``cfg`` (and ``dist_info``), any other
    name the registered method with its keyword ``options[name]``."""
    options = options or {}
    return [HiSTMethod(cfg, dist_info=dist_info) if n == HiSTMethod.name else get_method(n, **dict(options.get(n, {})))
            for n in names]


def cross_validate(
    cfg: TrainConfig, slides_dir: str | Path, out_dir: str | Path, *, k: int = 4, group_by: str | None = None,
    folds: str | Path | Sequence[Mapping[str, Sequence[str]]] | None = None,
    slide_ids: Sequence[str] | None = None, baselines: Sequence[str] = (),
    baseline_options: Mapping[str, Mapping[str, Any]] | None = None, write_predictions: bool = True,
    mc_samples: int = 0, progress: bool = True,
) -> CVResult:
    """``hist-st cv``: HiST with ``cfg`` and optional baselines on a folder of prepared slides.

    Args:
        cfg: HiST's training configuration; its ``seed`` makes the folds and trains every method, its
            ``genes`` and ``embedding`` make the plan.
        slides_dir, out_dir: Prepared cohort and run directory (`run_cv`).
        k, group_by, folds, slide_ids: As in `hist_st.evaluate.make_plan`.
        baselines: Names from `hist_st.methods` run on the same plan, e.g. ``["ridge", "mean"]``.
        baseline_options: Per-baseline keyword options.
        write_predictions, mc_samples, progress: As in `run_cv`.

    Returns:
        `run_cv`'s `CVResult`.
    """
    known = [m for m in list_methods() if m != HiSTMethod.name]
    unknown = [b for b in baselines if b not in known]
    if unknown:
        raise InputError("--baselines", f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if mc_samples < 0:
        raise InputError("--mc-samples", f"must be >= 0, got {mc_samples}")
    info = init_distributed(cfg.device)  # under torchrun every rank trains each fold together
    plan = make_plan(slides_dir, cfg.genes, k=k, seed=cfg.seed, group_by=group_by, folds=folds,
                     slide_ids=slide_ids, embedding=cfg.embedding)
    methods = build_methods([HiSTMethod.name, *baselines], cfg, baseline_options, dist_info=info)
    return run_cv(plan, methods, out_dir, seed=cfg.seed, write_predictions=write_predictions, mc_samples=mc_samples,
                  dist_info=info, progress=progress)
