"""Super-resolution from coarse labels, measured against the real spots (issue 13; results and the methods
in words: ``docs/results/superres.md``).

Every ``k x k`` block of neighbouring spots of each prepared slide becomes one coarse spot (block =
``floor(lattice / k)``, counts summed, `hist_st.train.coarse.coarsen_slide`). On each fold by slide, the
four predictions of every held-out spot (`REFERENCES`; ``superres`` is HiST with ``supervise=coarse<k>``) are
scored against its measured counts (`hist_st.metrics.evaluate_fold`); then the gap closed (`gap_closed`, on
the means over folds and within each fold) and the block-level checks (`COARSE_LEVEL`).

Output folder: ``superres.json``, ``table.md``, ``maps_<slide>.png`` (measured spots, measured blocks and the
four predictions for a held-out slide), ``fold_<i>/<model>/`` training runs (each with its result-cache entry in
``cache/``: a rerun with the same key loads the model instead of training it) and
``fold_<i>/predictions/<slide>.npz`` (log1p predictions of each method, measured counts, spot and block
coordinates).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.bench import markdown_table
from hist_st.errors import InputError
from hist_st.evaluate.cache import ResultCache, cached_file, fold_key, slide_fingerprint, write_file_entry
from hist_st.evaluate.plan import Plan, make_plan
from hist_st.experiments.accuracy import CVSetup
from hist_st.jsonio import to_jsonable, write_json
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.methods import HiSTMethod
from hist_st.metrics import evaluate_fold, summarise_folds
from hist_st.pl import draw_spots, normalise_counts, pyplot, save_figure
from hist_st.slide import read_prepared, write_prepared
from hist_st.train.checkpoint import load_bundle
from hist_st.train.coarse import coarsen_slide
from hist_st.train.config import TrainConfig
from hist_st.train.data import gene_counts, read_manifest, select_genes
from hist_st.train.folds import save_folds
from hist_st.train.loop import train
from hist_st.train.predict import predict_log1p
from hist_st.train.subspot import set_subspot_grid, subspot_slide

__all__ = ["METHODS", "REFERENCES", "gaussian_interpolate", "gap_closed", "position_effect", "run_superres", "run_subspot",
           "superres_markdown"]

#: Methods scored at the spot level, in table order.
METHODS = ("coarse_copy", "coarse_smooth", "superres", "spot")
REFERENCES = {
    "coarse_copy": "(a) coarse model, block prediction / members copied to each spot",
    "coarse_smooth": "(b) coarse model, Gaussian interpolation in count space",
    "superres": "HiST super-resolution (trained on blocks, predicts spots)",
    "spot": "(c) HiST trained on the spots (ceiling)",
}
#: Block-level checks: the coarse model, and the super-resolution predictions summed per block.
COARSE_LEVEL = {"coarse_model": "coarse model", "superres_summed": "super-resolution, spots summed per block"}
_METRICS = (("per_gene", "pcc"), ("per_gene", "r2"), ("pooled", "pcc"), ("pooled", "r2"))


def gaussian_interpolate(fine_xy: np.ndarray, coarse_xy: np.ndarray, values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted average of coarse ``values`` at fine positions (Nadaraya-Watson).

    Args:
        fine_xy: Fine positions ``[N, 2]`` (any unit).
        coarse_xy: Coarse positions ``[M, 2]`` (same unit).
        values: Values at the coarse positions ``[M, G]`` (e.g. counts per member).
        sigma: Gaussian width (same unit), > 0.

    Returns:
        ``[N, G]``: ``sum_j w_ij values_j / sum_j w_ij`` with ``w_ij = exp(-|x_i - c_j|^2 / (2 sigma^2))``.
    """
    if not sigma > 0:
        raise InputError("sigma", f"must be > 0, got {sigma}")
    d2 = ((np.asarray(fine_xy)[:, None, :] - np.asarray(coarse_xy)[None, :, :]) ** 2).sum(-1)  # [N, M]
    w = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2.0 * sigma**2))  # shifted per row: no underflow to 0/0
    return (w @ np.asarray(values, dtype=np.float64)) / w.sum(1, keepdims=True)


def position_effect(values: np.ndarray, position: np.ndarray, groups: np.ndarray) -> float:
    """How much a map depends on where a spot sits inside its block (an artefact when supervision is by block).

    For each gene, the deviation of each spot from its block's mean is averaged per within-block position;
    the root mean square of those position means, averaged over genes and divided by the mean per-gene
    std of ``values`` (measured maps give the noise floor: ``docs/results/superres.md``).

    Args:
        values: ``[N, G]`` (e.g. log1p), for spots of complete blocks only.
        position: ``[N]`` position of each spot inside its block (e.g. ``(row % k) * k + col % k``).
        groups: ``[N]`` block of each spot.
    """
    _, g = np.unique(groups, return_inverse=True)
    values = np.asarray(values, dtype=np.float64)
    dev = values - (_sum_by(values, g, g.max() + 1) / np.bincount(g)[:, None])[g]
    means = np.stack([dev[position == p].mean(0) for p in np.unique(position)])  # [P, G]
    scale = values.std(0).mean()
    return float(np.sqrt((means**2).mean(0)).mean() / scale) if scale > 0 else float("nan")


def gap_closed(value: float, low: float, high: float) -> float:
    """``(value - low) / (high - low)``: share of the gap from a reference ``low`` to a ceiling ``high``."""
    return float((value - low) / (high - low)) if high != low else float("nan")


def _fit(cfg: Any, supervise: str, slides: Sequence[Any], run: Path, *, genes: list[str],
         cache: ResultCache | None, hits: list[str], fingerprints: Mapping[str, str]) -> Any:
    """Train HiST with ``cfg`` and ``supervise`` on ``slides`` into ``run`` (``fold_<i>/<model>``) and return
    its bundle, or load the model the result cache holds there for the same key (`fold_key`, with the config's
    supervision; ``fingerprints``: slide id -> `slide_fingerprint`, computed once per slide by the caller); a
    cached model is named in ``hits``."""
    cfg = dataclasses.replace(cfg, supervise=supervise)
    key = fold_key(HiSTMethod(cfg), {"train": [s.slide_id for s in slides], "test": []}, genes,
                   embedding=cfg.embedding, seed=cfg.seed, fingerprints=fingerprints)
    path = cached_file(cache, key, run)
    if path is not None:
        hits.append(f"{run.parent.name}/{run.name}")
        return load_bundle(path)
    t0 = time.perf_counter()
    result = train(cfg, list(slides), genes=genes, out_dir=run, desc=f"{run.parent.name} {run.name}",
                   overwrite=True)
    write_file_entry(run, key, "model.pt", time.perf_counter() - t0)
    return result.bundle


def _counts(log1p: np.ndarray) -> np.ndarray:
    """Counts of log1p predictions, float64, negatives clipped to 0."""
    return np.maximum(np.expm1(np.asarray(log1p, dtype=np.float64)), 0.0)


def _sum_by(values: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """``[n, G]`` sums of the rows of ``values [N, G]`` per group (``groups [N]`` in ``0..n-1``)."""
    sums = np.zeros((n, values.shape[1]))
    np.add.at(sums, groups, values)
    return sums


#: The default setup of both experiments: 250 most expressed genes, 4 folds by slide, seed 0.
SETUP = CVSetup(genes="he:250")


def _plan(cohort: Path, setup: CVSetup) -> tuple[TrainConfig, Plan, list[str]]:
    """HiST's config (with the plan's embedding), the plan (folds by slide) and the genes of ``setup``."""
    cfg = setup.train_config()
    plan = make_plan(cohort, cfg.genes, k=setup.folds, seed=cfg.seed, embedding=cfg.embedding)
    genes = plan.genes if plan.genes is not None else select_genes(list(plan.slides.values()), cfg.genes,
                                                                    read_manifest(cohort))
    return dataclasses.replace(cfg, embedding=plan.embedding), plan, genes


def run_superres(cohort: str | Path, out: str | Path, *, setup: CVSetup = SETUP, block: int = 2,
                 sigma_fraction: float = 0.5, plot_genes: Sequence[str] | None = None, reuse: bool = True,
                 command: str | None = None) -> dict[str, Any]:
    """Train the super-resolution model and the three references on every fold; score them on the spots.

    Args:
        cohort: Folder of prepared slides (spot level).
        out: Output folder (layout in the module docstring).
        setup: Gene set, folds (by slide), fold and training seed, HiST config and overrides, progress.
        block: Block side ``k`` in spots (2: 2 x 2 blocks).
        sigma_fraction: Width of the Gaussian interpolation as a fraction of the coarse pitch.
        plot_genes: Genes of the map figure (default: the two with the highest spot-level variance of
            normalised measured expression on the figure's slide).
        reuse: Take a fold's model from the result cache (``fold_<i>/<model>/cache/``) when an earlier call
            trained it with the same key (config with supervision, slides and their content, genes, embedding,
            seed); the models taken are listed in ``cached_models``.
        command: The command line, recorded in the JSON.

    Returns:
        The dict written to ``superres.json``: ``methods`` (fold summaries), ``coarse_level``, ``gap_closed``,
        ``folds``, ``genes``, settings.

    Raises:
        InputError: Bad gene spec, block, sigma, or slides without counts.
    """
    if block < 2:
        raise InputError("--block", f"must be >= 2 (coarse spots of block x block spots), got {block}")
    if not sigma_fraction > 0:
        raise InputError("--sigma", f"must be > 0 (a fraction of the coarse pitch), got {sigma_fraction}")
    cohort, out = Path(cohort), Path(out)
    cfg, plan, gene_list = _plan(cohort, setup)
    by_id, slides, fold_list, emb = dict(plan.slides), list(plan.slides.values()), plan.folds, plan.embedding
    coarse = {s.slide_id: coarsen_slide(s, block, emb) for s in slides}
    out.mkdir(parents=True, exist_ok=True)
    save_folds(fold_list, out / "splits.json", k=len(fold_list), seed=cfg.seed, group_by=None, slides_dir=str(cohort))
    (out / "genes.txt").write_text("\n".join(gene_list) + "\n")

    cache, hits, fold_scores, fold_records = (ResultCache() if reuse else None), [], [], []
    fit = functools.partial(_fit, genes=gene_list, cache=cache, hits=hits)
    prints = {s.slide_id: slide_fingerprint(s, emb) for s in slides}  # each slide hashed once, not per model
    coarse_prints = {c.slide_id: slide_fingerprint(c, emb) for c, _ in coarse.values()}
    artefact: dict[str, list[float]] = {m: [] for m in ("measured", "superres", "coarse_smooth", "spot")}
    for f in fold_list:
        i, fine_train = int(f["fold"]), [by_id[s] for s in sorted(f["train"])]
        fdir = out / f"fold_{i}"
        b_spot = fit(cfg, "spot", fine_train, fdir / "spot", fingerprints=prints)
        b_sr = fit(cfg, f"coarse{block}", fine_train, fdir / "superres", fingerprints=prints)
        b_coarse = fit(cfg, "spot", [coarse[s][0] for s in sorted(f["train"])], fdir / "coarse",
                       fingerprints=coarse_prints)
        preds, truths, coarse_truths, full_rows = {}, {}, {}, []  # preds: slide -> method -> log1p [N, G]
        for sid in sorted(f["test"]):
            fine, (cslide, groups) = by_id[sid], coarse[sid]
            truths[sid] = gene_counts(fine, gene_list).toarray()
            coarse_truths[sid] = gene_counts(cslide, gene_list).toarray()
            n_children = np.bincount(groups, minlength=cslide.n_spots)
            c_counts = _counts(predict_log1p(b_coarse, cslide)[0])  # [M, G]
            per_member = c_counts / n_children[:, None]
            sigma_px = sigma_fraction * float(cslide.spot_pitch_um) / float(fine.um_per_px)
            smooth = gaussian_interpolate(fine.spatial, cslide.spatial, per_member, sigma_px)
            sr = predict_log1p(b_sr, fine)[0]
            pred = preds[sid] = {
                "coarse_copy": np.log1p(per_member[groups]).astype(np.float32),
                "coarse_smooth": np.log1p(smooth).astype(np.float32), "superres": sr,
                "spot": predict_log1p(b_spot, fine)[0], "coarse_model": np.log1p(c_counts),
                "superres_summed": np.log1p(_sum_by(_counts(sr), groups, len(c_counts)))}
            lat = to_lattice(continuous_coords(fine))
            full = n_children[groups] == block * block
            full_rows.append((((lat[:, 0] % block) * block + lat[:, 1] % block)[full],
                              groups[full] + 10**6 * len(full_rows),  # blocks of different slides stay apart
                              {m: np.asarray(pred.get(m, np.log1p(truths[sid])))[full] for m in artefact}))
            (fdir / "predictions").mkdir(parents=True, exist_ok=True)
            np.savez_compressed(fdir / "predictions" / f"{sid}.npz", **{m: pred[m] for m in METHODS},
                                counts=truths[sid], groups=groups, spatial=fine.spatial,
                                coarse_spatial=cslide.spatial)
        pos, blocks = (np.concatenate([r[j] for r in full_rows]) for j in (0, 1))  # a row per test slide
        for m in artefact:
            artefact[m].append(position_effect(np.concatenate([r[2][m] for r in full_rows]), pos, blocks))
        scores = {m: evaluate_fold({sid: p[m] for sid, p in preds.items()},
                                   coarse_truths if m in COARSE_LEVEL else truths)
                  for m in (*METHODS, *COARSE_LEVEL)}
        fold_scores.append(scores)
        fold_records.append({"fold": i, "test": sorted(f["test"]),
                             **{m: {"pooled": scores[m]["pooled"], "per_gene_pcc": scores[m]["per_gene"]["pcc"],
                                    "per_gene_r2": scores[m]["per_gene"]["r2"]} for m in METHODS}})

    summaries = {m: summarise_folds([s[m] for s in fold_scores]) for m in (*METHODS, *COARSE_LEVEL)}
    gaps, fold_gaps = {}, {}  # method -> metric -> gap closed on the fold means / per fold
    for name in ("superres", "coarse_smooth"):  # per metric: this method, (a) coarse copy, (c) spot
        xac = {f"{p}_{k}": [summaries[m][p][k] for m in (name, "coarse_copy", "spot")] for p, k in _METRICS}
        gaps[name] = {key: gap_closed(*(v["mean"] for v in stats)) for key, stats in xac.items()}
        fold_gaps[name] = {key: [gap_closed(*v) for v in zip(*(s["values"] for s in stats))]
                           for key, stats in xac.items()}
    fig_fold, fig_slide = int(fold_list[0]["fold"]), sorted(fold_list[0]["test"])[0]  # the map figure's slide
    data = np.load(out / f"fold_{fig_fold}" / "predictions" / f"{fig_slide}.npz")
    counts, groups, xy = data["counts"].astype(np.float64), data["groups"], by_id[fig_slide].spatial
    block_mean = _sum_by(counts, groups, groups.max() + 1) / np.bincount(groups)[:, None]
    panels = [("measured spots", xy, normalise_counts(counts), 1),
              ("measured 2x2 blocks\n(block / members)", xy, normalise_counts(block_mean[groups]), 1),
              *((_SHORT[m], xy, normalise_counts(_counts(data[m])), 1) for m in METHODS)]
    figure = _draw_maps(by_id[fig_slide], panels, gene_list, plot_genes, [[0, 1], [2, 3, 4, 5]],
                        f"{fig_slide} (held out, fold {fig_fold}): log1p(counts per 10k over the "
                        f"{len(gene_list)} genes); colour range per row: measured panels / predicted panels "
                        "(1st-99th percentile)", out / f"maps_{fig_slide}.png")
    result = to_jsonable({
        "command": command, "cohort": str(cohort), "genes": setup.genes, "n_genes": len(gene_list), "block": block,
        "sigma_fraction": sigma_fraction, "fine_pitch_um": {s.slide_id: s.spot_pitch_um for s in slides},
        "coarse_pitch_um": {sid: c.spot_pitch_um for sid, (c, _) in coarse.items()},
        "n_spots": {sid: int(s.n_spots) for sid, s in by_id.items()},
        "n_coarse_spots": {sid: int(c.n_spots) for sid, (c, _) in coarse.items()}, "epochs": cfg.epochs,
        "seed": cfg.seed, "folds": fold_records, "methods": {m: summaries[m] for m in METHODS},
        "coarse_level": {k: summaries[k] for k in COARSE_LEVEL},
        "gap_closed": gaps, "gap_closed_per_fold": fold_gaps,
        "position_effect": {m: {"mean": float(np.mean(v)), "values": v} for m, v in artefact.items() if v},
        "figure": str(figure.name), "figure_slide": fig_slide, "cached_models": hits,
    })
    write_json(result, out / "superres.json")
    (out / "table.md").write_text(superres_markdown(result))
    return result


def superres_markdown(result: dict[str, Any]) -> str:
    """The spot-level table (four methods, both protocols), the gap closed and the block-level check."""
    heads = ["per-gene PCC", "per-gene R2", "pooled PCC", "pooled R2"]
    per_fold = result.get("gap_closed_per_fold", {})

    def cells(s: Mapping[str, Any]) -> list[str]:
        return [f"{s[p][k]['mean']:.3f} ± {s[p][k]['std']:.3f}" for p, k in _METRICS]

    def gaps(name: str, g: Mapping[str, float]) -> list[str]:
        folds = [per_fold.get(name, {}).get(f"{p}_{k}") for p, k in _METRICS]
        return [f"{g[f'{p}_{k}']:.2f}" + (f" (folds {' / '.join(f'{v:.2f}' for v in f)})" if f else "")
                for (p, k), f in zip(_METRICS, folds)]

    lines = [*markdown_table(["method (scored on the measured spots)", *heads],
                             ([REFERENCES[m], *cells(result["methods"][m])] for m in METHODS)), "",
             *markdown_table(["gap closed (x - a) / (c - a)", *heads],
                             ([name, *gaps(name, g)] for name, g in result["gap_closed"].items())),
             "", "Gap closed: on the means over folds, and per fold in brackets (a fold's own a, c and "
             "method).", "",
             *markdown_table(["block-level check (scored on the measured blocks)", *heads],
                             ([COARSE_LEVEL.get(k, k), *cells(s)]
                              for k, s in result["coarse_level"].items()))]
    if result.get("cached_models"):
        lines += ["", "Taken from the result cache (trained identically before): " + ", ".join(result["cached_models"])]
    if result.get("position_effect"):
        lines += ["", "Within-block position effect (`position_effect`, complete blocks of the held-out slides; measured = "
                  "noise floor): " + ", ".join(f"{m} {v['mean']:.3f}" for m, v in result["position_effect"].items())]
    return "\n".join(lines) + "\n"


#: Short panel titles of the map figure.
_SHORT = {"coarse_copy": "(a) coarse copy", "coarse_smooth": "(b) Gaussian interpolation",
          "superres": "super-resolution", "spot": "(c) trained on spots"}


def _draw_maps(slide: Any, panels: Sequence[tuple[str, np.ndarray, np.ndarray, float]], genes: list[str],
               plot_genes: Sequence[str] | None, groups: Sequence[Sequence[int]], title: str,
               path: Path) -> Path:
    """One row per gene of ``plot_genes`` (default: the two most variable of the first panel); ``panels``:
    (title, spot centres in px ``[N, 2]``, values ``[N, G]``, dot size relative to the slide's pitch).
    Panels of one group of ``groups`` share a colour range (1st-99th percentile) and a colour bar; spots are
    circles of 0.85 x their pitch over the slide's image."""
    missing = [g for g in plot_genes or () if g not in genes]
    if missing:
        raise InputError("--plot-genes", f"not among the run's genes: {missing}")
    chosen = [genes.index(g) for g in plot_genes or ()] or list(np.argsort(-panels[0][2].var(0))[:2])
    img, scale = slide.plot_image()
    pitch = float(slide.spot_pitch_um or 200.0) / float(slide.um_per_px or 1.0) * scale  # display px
    fig, axes = pyplot().subplots(len(chosen), len(panels), figsize=(2.6 * len(panels), 2.7 * len(chosen)),
                                  dpi=120, squeeze=False)
    for r, g in enumerate(chosen):
        for group in groups:
            lo, hi = np.percentile(np.concatenate([panels[j][2][:, g] for j in group]), [1, 99])
            for j in group:
                name, xy_px, values, rel = panels[j]
                ax, xy = axes[r, j], np.asarray(xy_px) * scale
                if img is not None:
                    ax.imshow(img)
                dots = draw_spots(ax, xy, 0.85 * rel * pitch, values[:, g], "viridis", lo, max(hi, lo + 1e-6))
                ax.set(xlim=(xy[:, 0].min() - pitch, xy[:, 0].max() + pitch), xticks=[], yticks=[],
                       ylim=(xy[:, 1].max() + pitch, xy[:, 1].min() - pitch), aspect="equal")
                if r == 0:
                    ax.set_title(name, fontsize=8)
                if j == 0:
                    ax.set_ylabel(genes[g], fontsize=9)
            fig.colorbar(dots, ax=axes[r, group[-1]], fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)


def run_subspot(cohort: str | Path, out: str | Path, *, setup: CVSetup = SETUP, fold: int = 0, factor: int = 2,
                plot_genes: Sequence[str] | None = None, reuse: bool = True) -> dict[str, Any]:
    """Sub-spot tokens on one fold: ``factor x factor`` patches per spot, supervised by the measured spots.

    The model (``supervise=coarse<factor>`` on `hist_st.train.subspot.subspot_slide` slides) predicts at
    ``pitch / factor``; its sub-spot predictions summed per spot are scored against the measured spots beside
    HiST trained on the spots (``fold_<i>/spot``, shared with `run_superres` in the same ``out``). There is no
    measurement below the spot, so this scores only what the spots can check; the maps show the rest.

    Writes ``subspot_fold<i>.json`` and ``subspot_maps_<slide>.png``; sub-spot slides are cached in
    ``subspots/<slide>.h5ad``. ``setup``, ``plot_genes``, ``reuse``: as in `run_superres`. The result's
    ``cached`` lists the fold models and sub-spot slides taken from the result cache.
    """
    cohort, out = Path(cohort), Path(out)
    cfg, plan, gene_list = _plan(cohort, setup)
    by_id, fold_list = dict(plan.slides), plan.folds
    if not 0 <= fold < len(fold_list):
        raise InputError("--fold", f"must be in 0..{len(fold_list) - 1}, got {fold}")
    f = fold_list[fold]
    sub_dir, cache, hits, subs = out / "subspots", (ResultCache() if reuse else None), [], {}
    prints = {sid: slide_fingerprint(s, plan.embedding) for sid, s in by_id.items()}
    for sid in sorted(by_id):  # sub-spot slides: from the cache when made from the same slide content and factor
        key = {"subspot_factor": factor, "slide": prints[sid]}
        path = cached_file(cache, key, sub_dir)
        if path is not None:
            hits.append(f"subspots/{sid}.h5ad")
        else:
            t0 = time.perf_counter()
            path = write_prepared(subspot_slide(by_id[sid], factor, progress=setup.progress), sub_dir / f"{sid}.h5ad")
            write_file_entry(sub_dir, key, path.name, time.perf_counter() - t0)
        subs[sid] = set_subspot_grid(read_prepared(path), by_id[sid])  # as stored: a fresh and a cached run alike
    fdir = out / f"fold_{fold}"
    fit = functools.partial(_fit, genes=gene_list, cache=cache, hits=hits)
    b_spot = fit(cfg, "spot", [by_id[s] for s in sorted(f["train"])], fdir / "spot", fingerprints=prints)
    sub_train = [subs[s] for s in sorted(f["train"])]
    b_sub = fit(cfg, f"coarse{factor}", sub_train, fdir / f"subspot{factor}",
                fingerprints={s.slide_id: slide_fingerprint(s, plan.embedding) for s in sub_train})
    test = sorted(f["test"])
    fine = {sid: predict_log1p(b_sub, subs[sid])[0] for sid in test}
    parents = {sid: np.asarray(subs[sid].obs["parent"], dtype=np.int64) for sid in test}
    truths = {sid: gene_counts(by_id[sid], gene_list).toarray() for sid in test}
    preds = {"spot": {sid: predict_log1p(b_spot, by_id[sid])[0] for sid in test},
             "subspot_summed": {sid: np.log1p(_sum_by(_counts(fine[sid]), parents[sid], by_id[sid].n_spots))
                                for sid in test}}
    scores = {k: summarise_folds([evaluate_fold(v, truths)]) for k, v in preds.items()}
    artefact = position_effect(np.concatenate([fine[s] for s in test]),
                               np.concatenate([np.arange(subs[s].n_spots) % (factor * factor) for s in test]),
                               np.concatenate([parents[s] + 10**6 * i for i, s in enumerate(test)]))
    sid = test[0]  # the figure: measured spots, HiST on the spots, the sub-spot model; own colour range each
    slide, sub = by_id[sid], subs[sid]
    panels = [("measured spots", slide.spatial, normalise_counts(truths[sid]), 1),
              ("HiST trained on the spots", slide.spatial, normalise_counts(np.expm1(preds["spot"][sid])), 1),
              (f"sub-spot model ({sub.spot_pitch_um:.0f} um)", sub.spatial,
               normalise_counts(np.expm1(fine[sid])), 1.0 / factor)]
    figure = _draw_maps(slide, panels, gene_list, plot_genes, [[0], [1], [2]],
                        f"{sid} (held out, fold {fold}): log1p(counts per 10k over the {len(gene_list)} "
                        "genes), own colour range per panel", out / f"subspot_maps_{sid}.png")
    result = to_jsonable({
        "cohort": str(cohort), "genes": setup.genes, "n_genes": len(gene_list), "fold": fold, "test": test,
        "factor": factor, "epochs": cfg.epochs, "sub_pitch_um": sub.spot_pitch_um,
        "n_subspots": {s: int(subs[s].n_spots) for s in test}, "scores": scores, "figure": figure.name,
        "position_effect": artefact, "cached": hits,
    })
    write_json(result, out / f"subspot_fold{fold}.json")
    return result

