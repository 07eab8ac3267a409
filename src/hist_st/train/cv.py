"""K-fold cross-validation by slide or patient, HiST and baselines on identical folds and genes.

```python
from hist_st.train import load_config
from hist_st.train.cv import run_cv
summary = run_cv(load_config(None, ["epochs=20"]), "cohort/", "runs/cv", k=4, baselines=["ridge", "mean"])
print(summary["table"])
```

Run directory layout::

    config.yaml            resolved TrainConfig
    splits.json            the exact folds (and k, seed, group_by)
    genes.txt              genes (scope 'dataset'); per fold under fold_<i>/genes.txt for 'train-only'
    versions.json          package versions
    fold_<i>/              model.pt, history.json, config.yaml, genes.txt
    fold_<i>/predictions/  <slide_id>.h5ad prediction files (X = predicted counts, layers['log1p'], measured counts)
    fold_<i>/metrics.json  per-method fold metrics (both protocols, per slide, per gene)
    metrics.json           per-method summaries over folds (mean, std, values) + per-fold numbers
    table.md               Table-2 style comparison, both protocols labelled
    loss_curves.png        training loss per epoch, one line per fold

HiST is evaluated at the final epoch (no model selection on test slides).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hist_st.errors import InputError
from hist_st.jsonio import to_jsonable, write_json
from hist_st.outputs import fresh_folder
from hist_st.runtime import package_versions
from hist_st.slide import Slide, write_prepared
from hist_st.train.config import TrainConfig, save_config
from hist_st.train.data import embedding_key, gene_counts, load_slides, read_manifest, select_genes
from hist_st.train.folds import make_folds, save_folds
from hist_st.train.splits import check_folds, read_splits

__all__ = ["run_cv", "slide_groups", "fold_json", "plot_loss_curves"]

HIST = "HiST"


def slide_groups(
    slides: Sequence[Slide], group_by: str, manifest: Mapping[str, Any] | None = None
) -> dict[str, str | None]:
    """Slide id -> group for ``group_by``: ``patient`` (the slide's patient), a manifest mapping
    (``manifest[group_by][slide_id]``), or a key of ``slide.meta``.

    A slide whose patient is unknown (blank in HEST, written as NaN) maps to None: `make_folds` gives it
    a group of its own and the folds name it. Other group columns must have a value for every slide."""
    out: dict[str, str | None] = {}
    for s in slides:
        value = None
        if group_by == "patient":
            value = s.patient
        if value is None and manifest is not None and isinstance(manifest.get(group_by), Mapping):
            value = manifest[group_by].get(s.slide_id)
        if value is None:
            value = s.meta.get(group_by)
        if value is None or value == "" or (isinstance(value, float) and value != value):
            if group_by == "patient":
                out[s.slide_id] = None
                continue
            raise InputError(f"slide {s.slide_id!r}", f"has no value for the group column {group_by!r}")
        out[s.slide_id] = str(value)
    return out


def fold_json(result: Mapping[str, Any], genes: Sequence[str]) -> dict[str, Any]:
    """`evaluate_fold` output made JSON-friendly, per-gene arrays keyed by gene name."""
    out = to_jsonable(dict(result))
    pg = out.get("per_gene", {})
    for key in ("pcc_per_gene", "r2_per_gene"):
        if isinstance(pg.get(key), list) and len(pg[key]) == len(genes):
            pg[key] = dict(zip(genes, pg[key]))
    if isinstance(pg.get("excluded_genes"), list):
        pg["excluded_genes"] = [genes[i] for i in pg["excluded_genes"] if 0 <= i < len(genes)]
    return out


def plot_loss_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Training loss per epoch, one line per fold (log-scale y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, hist in histories.items():
        if hist:
            ax.plot([h["epoch"] for h in hist], [h["loss"] for h in hist], label=name, lw=1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training MSE (log1p counts)")
    ax.set_yscale("log")
    ax.set_title("HiST training loss per fold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_cv(
    cfg: TrainConfig,
    slides_dir: str | Path,
    out_dir: str | Path,
    *,
    k: int = 4,
    group_by: str | None = None,
    folds: str | Path | Sequence[Mapping[str, Sequence[str]]] | None = None,
    slide_ids: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
    baseline_options: Mapping[str, Mapping[str, Any]] | None = None,
    write_predictions: bool = True,
    mc_samples: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-validate HiST (and optional baselines) on a folder of prepared slides.

    Args:
        cfg: Training configuration (the same for every fold).
        slides_dir: Folder of prepared slides (+ optional ``cohort.json``).
        out_dir: Run directory (layout in the module docstring).
        k: Number of folds.
        group_by: None (folds by slide, the paper) or a group column such as ``"patient"``.
        folds: Explicit folds (a `save_folds` file or a list of ``{"train", "test"}``) instead of making them.
        slide_ids: Restrict the cohort to these slides.
        baselines: Names from `hist_st.baselines` (e.g. ``["ridge", "mean"]``) run on the same folds,
            genes and embedding.
        baseline_options: Per-baseline keyword options.
        write_predictions: Write HiST's test predictions as prepared slides.
        mc_samples: MC-dropout passes for the written predictions' ``predicted_std`` (0: none).
        progress: Show progress bars.

    Returns:
        ``{"methods": {name: summarise_folds(...)}, "folds": [...], "table": str, "genes": [...],
        "out_dir": str, "seconds": {name: float}}``.
    """
    from tqdm.auto import tqdm

    from hist_st.baselines import list_baselines
    from hist_st.metrics import evaluate_fold, format_table, summarise_folds
    from hist_st.train.distributed import init_distributed
    from hist_st.train.loop import train
    from hist_st.train.predict import predict_log1p, predict_slide

    unknown = [b for b in baselines if b not in list_baselines()]
    if unknown:
        raise InputError("--baselines", f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(list_baselines())}")
    if mc_samples < 0:
        raise InputError("--mc-samples", f"must be >= 0, got {mc_samples}")
    # Under torchrun every rank trains each fold together; rank 0 alone predicts, scores and writes.
    info = init_distributed(cfg.device)
    master = info.is_master
    out = Path(out_dir)
    slides = load_slides(slides_dir, slide_ids)
    by_id = {s.slide_id: s for s in slides}
    manifest = read_manifest(slides_dir)
    ids = sorted(by_id)

    # folds ------------------------------------------------------------------------------------------
    if folds is None:
        groups = slide_groups(slides, group_by, manifest) if group_by else None
        fold_list = make_folds(ids, k, cfg.seed, groups)
    elif isinstance(folds, (str, Path)):
        fold_list = read_splits(folds, ids)
    else:
        fold_list = check_folds(list(folds), ids)
    # Every input is checked: from here on the run writes; a failure removes a folder it created.
    with fresh_folder(out, enabled=master):
        if master:
            save_folds(fold_list, out / "splits.json", k=len(fold_list), seed=cfg.seed, group_by=group_by,
                       slides_dir=str(slides_dir))

        emb = embedding_key(slides, cfg.embedding)
        dataset_genes = None
        if cfg.genes.scope == "dataset" or cfg.genes.genes:
            dataset_genes = select_genes(slides, cfg.genes, manifest)
        if master:
            if dataset_genes is not None:
                (out / "genes.txt").write_text("\n".join(dataset_genes) + "\n")
            save_config(cfg, out / "config.yaml")
            write_json(package_versions(), out / "versions.json")

        baseline_options = dict(baseline_options or {})
        methods = [HIST, *baselines]
        per_method: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        seconds: dict[str, float] = {m: 0.0 for m in methods}
        histories: dict[str, list[dict[str, float]]] = {}
        fold_records = []
        bar = tqdm(fold_list, desc="cv folds", unit="fold", disable=not (progress and master))
        for f in bar:
            i = int(f["fold"])
            fdir = out / f"fold_{i}"
            train_slides = [by_id[s] for s in sorted(f["train"])]
            test_slides = [by_id[s] for s in sorted(f["test"])]
            genes = dataset_genes if dataset_genes is not None else select_genes(train_slides, cfg.genes, None)
            truths = {s.slide_id: gene_counts(s, genes) for s in test_slides}
            fold_metrics: dict[str, Any] = {}

            t0 = time.perf_counter()
            result = train(cfg, train_slides, out_dir=fdir, genes=genes, desc=f"fold {i}", dist_info=info,
                           overwrite=True)  # a cv run replaces its own earlier folds
            if not master:
                continue
            preds = {}
            for s in test_slides:
                mean, _ = predict_log1p(result.bundle, s)
                preds[s.slide_id] = mean
                if write_predictions:
                    write_prepared(predict_slide(result.bundle, s, mc_samples=mc_samples, seed=cfg.seed),
                                   fdir / "predictions" / f"{s.slide_id}.h5ad")
            seconds[HIST] += time.perf_counter() - t0
            histories[f"fold {i}"] = result.history
            fold_metrics[HIST] = evaluate_fold(preds, truths)

            for name in baselines:
                from hist_st.baselines import get_baseline

                t0 = time.perf_counter()
                model = get_baseline(name, **dict(baseline_options.get(name, {})))
                model.fit(train_slides, genes, embedding_key=emb, seed=cfg.seed)
                bpreds = {s.slide_id: model.predict(s) for s in test_slides}
                seconds[name] += time.perf_counter() - t0
                fold_metrics[name] = evaluate_fold(bpreds, truths)

            for m in methods:
                per_method[m].append(fold_metrics[m])
            record = {"fold": i, "train": list(f["train"]), "test": list(f["test"]), "n_genes": len(genes),
                      "metrics": {m: fold_json(fold_metrics[m], genes) for m in methods}}
            write_json(record, fdir / "metrics.json")
            fold_records.append(
                {"fold": i, **{m: {"pooled": fold_metrics[m]["pooled"], "per_gene_pcc": fold_metrics[m]["per_gene"]["pcc"]}
                              for m in methods}}
            )
            if hasattr(bar, "set_postfix"):
                pg = fold_metrics[HIST]["per_gene"]["pcc"]
                bar.set_postfix(hist_pooled_r2=f"{fold_metrics[HIST]['pooled']['r2']:.3f}", hist_pcc=f"{pg:.3f}")

        if not master:
            return {"methods": {}, "folds": [], "table": "", "genes": dataset_genes, "out_dir": str(out),
                    "seconds": {}, "histories": {}, "embedding": emb}
        summaries = {m: summarise_folds(per_method[m]) for m in methods}
        table = format_table(summaries)
        write_json(
            {"methods": summaries, "folds": fold_records, "seconds": seconds, "embedding": emb,
             "group_by": group_by, "k": len(fold_list), "n_genes": len(dataset_genes) if dataset_genes else None},
            out / "metrics.json",
        )
        (out / "table.md").write_text(
            "Protocols: pooled = per-slide flattened N x G counts, averaged over test slides (HiST authors' "
            "metric); per-gene = log1p Pearson/R2 per gene over all test spots (HEST metric). "
            f"Mean ± std over {len(fold_list)} folds.\n\n" + table + "\n"
        )
        plot_loss_curves(histories, out / "loss_curves.png")
        return {
            "methods": summaries,
            "folds": fold_records,
            "table": table,
            "genes": dataset_genes,
            "out_dir": str(out),
            "seconds": seconds,
            "histories": histories,
            "embedding": emb,
        }
