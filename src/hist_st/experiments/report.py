"""One command that reproduces the paper's tables on a cohort and writes ``docs/results/<name>.md``.

Steps (each skipped when its results already exist under ``runs_dir``, unless ``force``):

1. Table 2 (`run_accuracy`) for each gene set;
2. Table 1 (`run_efficiency`) on fold 0 of the cohort, and optionally Figure 3 (`run_scaling`);
3. Table 3 (`run_ablation`) on the first gene set;
4. Table 5 (`run_stain`) when a Macenko-normalised copy of the cohort is given;
5. Table 6 and Figure 4 (`run_token_analysis`) from the first gene set's HiST fold models;
6. a gene figure (`plot_genes`) for a test slide of fold 0.

The Markdown quotes the exact command, the package versions, the device and the time of each step.
Figures are copied beside it into ``docs/results/<name>/``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hist_st.bench.efficiency import Workers, run_efficiency
from hist_st.bench.scaling import run_scaling
from hist_st.cohort import CohortManifest, GeneSet
from hist_st.errors import InputError
from hist_st.experiments.ablation import run_ablation
from hist_st.experiments.accuracy import CVSetup, build_config, per_gene_rows, run_accuracy
from hist_st.experiments.figures import plot_genes
from hist_st.experiments.stain import run_stain
from hist_st.experiments.tokens import run_token_analysis
from hist_st.jsonio import read_json
from hist_st.metrics import format_table
from hist_st.runtime import package_versions

__all__ = ["ReportSpec", "build_report"]


def _copy(src: str | Path, dest_dir: Path, name: str | None = None) -> str:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (name or Path(src).name)
    shutil.copyfile(src, dest)
    return dest.name


def _top_genes(run_dir: Path, n: int = 3) -> list[str]:
    """The HiST genes with the highest mean per-gene PCC (for display), from the fold metrics."""

    rows = [r for r in per_gene_rows(run_dir) if r["method"] == "HiST" and r["pcc_mean"] is not None]
    rows.sort(key=lambda r: -r["pcc_mean"])
    return [r["gene"] for r in rows[:n]]


def _rows_lines(run_dir: Path) -> list[str]:
    """Markdown of a HiST table run (Table 3 or 5): its ``table.md`` and the recorded HiST train + predict
    minutes over its row folders."""
    secs = [read_json(p).get("seconds", {}).get("HiST", 0.0) for p in sorted(run_dir.glob("*/metrics.json"))]
    return [(run_dir / "table.md").read_text() + "\n", f"Compute: {len(secs)} rows trained here, {sum(secs) / 60:.0f} "
            "min of recorded train + predict wall time in all.\n"]


def _efficiency_lines(eff: Mapping[str, Any]) -> list[str]:
    """Markdown of one `run_efficiency` result: its header, table and HiST's inference speed-up over STFlow."""
    lines = [eff["header"] + "\n", eff["table"] + "\n"]
    recs = {r["method"]: r for r in eff["records"] if "error" not in r}
    if "hist" in recs and "stflow" in recs:
        sp = recs["stflow"]["infer_s_per_slide"] / max(recs["hist"]["infer_s_per_slide"], 1e-12)
        lines.append(f"HiST inference is **{sp:.1f}x** faster than STFlow per slide at {recs['hist']['n_genes']} "
                     "genes.\n")
    return lines


@dataclass(frozen=True)
class ReportSpec:
    """Everything `build_report` runs, in one record.

    Attributes:
        name: Report name (file stem).
        cohort: Prepared cohort folder.
        docs_dir: Where the Markdown and its figure folder go.
        runs_dir: Where the experiment run directories go (default ``runs/report-<name>``).
        methods: Methods of Tables 1 and 2.
        gene_sets: Gene-set specs of Table 2 (the first is used by Tables 1, 3, 5, 6).
        folds, seed, config, overrides, baseline_options: As in `run_accuracy`.
        ablations: Table 3 rows (None: all; ``()`` skips Table 3).
        ablation_epochs: Epochs of every Table 3 row (default: the same as Table 2). The report states it.
        efficiency: Produce Table 1. ``efficiency_epochs``: epochs timed per method.
        efficiency_also: `run_efficiency` output folders measured elsewhere (e.g. on a GPU machine), shown
            under Table 1 with their own device and header.
        reuse_from: `run_accuracy` output folders whose identically computed methods Table 2 copies in
            (``run_accuracy(reuse_from=...)``); the report names the source of each copied row.
        scaling: Also produce Figure 3 (synthetic slides); ``scaling_options`` go to `run_scaling`.
        macenko: The Macenko-normalised copy of the cohort, for Table 5 (skipped when None).
        token_groups: Metadata columns for the token analysis.
        device: Device for the efficiency measurements.
        command: The command line quoted in the report.
        force: Recompute steps whose results exist.
        progress: Progress bars.
    """

    name: str
    cohort: str | Path
    docs_dir: str | Path = "docs/results"
    runs_dir: str | Path | None = None
    methods: Sequence[str] = ("hist", "mean", "ridge", "mlp", "bleep", "stnet", "stflow")
    gene_sets: Sequence[str] = ("hvg:2000", "he:250")
    folds: int = 4
    seed: int = 0
    config: str | Path | None = None
    overrides: Sequence[str] = ()
    baseline_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ablations: Sequence[str] | None = None
    ablation_epochs: int | None = None
    efficiency: bool = True
    efficiency_epochs: int = 2
    efficiency_also: Sequence[str | Path] = ()
    reuse_from: Sequence[str | Path] = ()
    scaling: bool = False
    scaling_options: Mapping[str, Any] = field(default_factory=dict)
    macenko: str | Path | None = None
    token_groups: Sequence[str] = ("patient",)
    device: str = "auto"
    command: str | None = None
    force: bool = False
    progress: bool = True


def build_report(spec: ReportSpec) -> Path:
    """Run every experiment of ``spec`` on its cohort and write ``docs_dir/<name>.md`` (see the module docstring).

    Args:
        spec: What to run and where (`ReportSpec`).

    Returns:
        The Markdown path.
    """
    name, cohort, methods, gene_sets = spec.name, Path(spec.cohort), list(spec.methods), list(spec.gene_sets or ())
    folds, seed, config, overrides, force = spec.folds, spec.seed, spec.config, list(spec.overrides), spec.force
    baseline_options, device, progress = dict(spec.baseline_options or {}), spec.device, spec.progress
    command = spec.command
    ablations, ablation_epochs, macenko = spec.ablations, spec.ablation_epochs, spec.macenko
    efficiency, efficiency_epochs, efficiency_also = spec.efficiency, spec.efficiency_epochs, spec.efficiency_also
    scaling, scaling_options, reuse_from = spec.scaling, dict(spec.scaling_options or {}), spec.reuse_from
    token_groups = spec.token_groups
    docs_dir, runs_dir = spec.docs_dir, spec.runs_dir
    if not gene_sets:
        raise InputError("--genes", "give at least one gene set")
    cohort = Path(cohort)
    runs = Path(runs_dir) if runs_dir is not None else Path("runs") / f"report-{name}"
    docs = Path(docs_dir)
    fig_dir = docs / name
    runs.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    md: list[str] = []

    def step(label: str, fn: Any) -> Any:
        """Time ``fn`` (each step reuses what it computed before with the same key unless ``force``)."""
        t0 = time.perf_counter()
        res = fn()
        timings[label] = time.perf_counter() - t0
        return res

    # 1. Table 2 ----------------------------------------------------------------------------------------
    acc: dict[str, Any] = {}
    for spec in gene_sets:
        d = runs / f"accuracy-{GeneSet.parse(spec).label}"
        acc[spec] = step(f"Table 2 ({spec})",
                         lambda d=d, spec=spec: run_accuracy([cohort], d, methods=methods, genes=spec, folds=folds,
                                                             seed=seed, config=config, overrides=overrides,
                                                             baseline_options=baseline_options, progress=progress,
                                                             reuse=not force, reuse_from=reuse_from,
                                                             command=command))
    first = gene_sets[0]
    cohort_key = next(iter(acc[first]["cohorts"]))
    first_run = Path(acc[first]["cohorts"][cohort_key]["run_dir"])

    # 2. Table 1 / Figure 3 --------------------------------------------------------------------------------
    eff = sca = None
    base_cfg = build_config(config, overrides)
    threads = int(base_cfg.threads)  # every method's worker uses HiST's thread count
    workers = Workers(methods=methods, epochs=efficiency_epochs, seed=seed, overrides=overrides,
                      baseline_options=baseline_options, device=device, threads=threads, progress=progress)
    if efficiency:
        eff = step("Table 1", lambda: run_efficiency(runs / "efficiency", workers=workers, cohort=cohort, genes=first,
                                                     folds=folds, reuse=not force))
    if scaling:
        sizes = dict(scaling_options or {})  # spots, genes_list (run_scaling); timeout, epochs (its workers)
        timed = dataclasses.replace(workers, epochs=int(sizes.pop("epochs", 1)),
                                    timeout=sizes.pop("timeout", 1800.0))
        sca = step("Figure 3", lambda: run_scaling(runs / "scaling", workers=timed, reuse=not force, **sizes))

    def setup(overrides: Sequence[str]) -> CVSetup:
        return CVSetup(genes=first, folds=folds, seed=seed, config=config, overrides=overrides, progress=progress)

    # 3. Table 3 -------------------------------------------------------------------------------------------
    abl = None
    ablation_overrides = list(overrides) + ([f"epochs={ablation_epochs}"] if ablation_epochs else [])
    if ablations is None or len(ablations) > 0:
        abl = step("Table 3",
                   lambda: run_ablation(cohort, runs / "ablation", setup=setup(ablation_overrides), names=ablations,
                                        skip_done=not force, reuse_from=[first_run]))

    # 4. Table 5 -------------------------------------------------------------------------------------------
    stn = None
    if macenko is not None:
        stn = step("Table 5",
                   lambda: run_stain(cohort, macenko, runs / "stain", setup=setup(overrides), skip_done=not force,
                                     reuse_from=[first_run, runs / "ablation" / "no-token"]))

    # 5. Table 6 / Figure 4 ----------------------------------------------------------------------------------
    tok = None
    if "hist" in methods:
        tok = step("Table 6",
                   lambda: run_token_analysis(first_run, cohort, runs / "tokens", group_by=token_groups))

    # 6. gene figure ---------------------------------------------------------------------------------------
    gene_fig = None
    pred_files = sorted((first_run / "fold_0" / "predictions").glob("*.h5ad"))
    if pred_files:
        genes = _top_genes(first_run, 3)
        if genes:
            truth = cohort / f"{pred_files[0].stem}.h5ad"
            gene_fig = step("gene figure", lambda: plot_genes(pred_files[0], genes, runs / "genes.png",
                                                             truth=truth if truth.is_file() else None))

    # Markdown ---------------------------------------------------------------------------------------------
    versions = package_versions()
    md.append(f"# HiST results: {name}\n")
    md.append("Generated by:\n\n```\n" + (command or f"hist-st report --name {name} --cohort {cohort}") + "\n```\n")
    md.append(f"Date: {_dt.datetime.now().isoformat(timespec='seconds')}. Cohort: `{cohort}`. Runs: `{runs}`. "
              f"Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".\n")
    for label, path in (("Cohort", cohort), ("Macenko copy", macenko)):
        m = CohortManifest.read(path) if path is not None else None
        if m is not None:
            patch = m.get("patch") or {}
            md.append(f"{label} `{path}`: {len(m.get('slide_ids', []))} slides ({', '.join(m.get('slide_ids', []))}), "
                      f"technology {m.get('technology')}, encoder(s) {', '.join(m.get('encoders', []))}, patches "
                      f"{patch.get('size_px')} px at {patch.get('um_per_px')} um/px, stain normalisation "
                      f"{m.get('stain_norm') or 'none'}.\n")
    md.append("Step times (this invocation; reused steps take ~0 s): "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ".\n")
    md.append("## Table 2: accuracy\n")
    md.append("Protocols: **pooled** = per-slide flattened N x G counts, averaged over test slides (HiST authors' "
              "metric, dominated by between-gene mean differences); **per-gene** = log1p Pearson/R2 per gene over "
              f"all test spots (HEST metric). Mean ± std over {folds} folds by slide (seed {seed}); every method "
              "on the same folds, genes, targets and embeddings. HiST is evaluated at its final epoch; nothing "
              "is tuned on test folds.\n")
    md.append(f"HiST: {base_cfg.epochs} epochs, AdamW lr {base_cfg.lr:g}, weight decay {base_cfg.weight_decay:g}, "
              f"{base_cfg.slides_per_step} slide per step, configuration in each run's `config.yaml`.\n")
    used = {src for a in acc.values() for c in a["cohorts"].values() for src in c.get("reused_from", {}).values()}
    unused = [str(Path(d)) for d in reuse_from if str(Path(d)) not in used]
    if unused:
        md.append("Not used by Table 2 (no method there with the same cohort, folds, genes and options): "
                  + ", ".join(f"`{d}`" for d in unused) + ".\n")
    if baseline_options:
        opts = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for m, o in baseline_options.items())
        md.append(f"Method options given on the command line (every other setting is the method's published "
                  f"default, see `hist_st.methods`): {opts}.\n")
    for spec in gene_sets:
        a = acc[spec]
        for cname, c in a["cohorts"].items():
            md.append(f"### {cname}, genes {spec} ({c.get('n_genes')} genes)\n")

            md.append(format_table(c["methods"]) + "\n")
            secs = c.get("seconds", {})
            if secs:
                md.append("Wall time over all folds (train + predict): "
                          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items()) + ".\n")
            by_device: dict[str, list[str]] = {}
            for method, dev in c.get("devices", {}).items():
                by_device.setdefault(dev or "not recorded", []).append(method)
            if by_device:
                md.append("Trained on: " + "; ".join(f"{', '.join(ms)}: {d}" for d, ms in by_device.items()) + ".\n")
            for method, src in c.get("reused_from", {}).items():
                src_rec = Path(src) / "accuracy.json"
                how = read_json(src_rec).get("command") if src_rec.is_file() else None
                md.append(f"Row `{method}` copied from a separate run with the same cohort, folds, genes and "
                          f"options, not trained by this command: `{src}`"
                          + (f", made by `{how}`" if how else "") + ".\n")
            md.append(f"Per-fold JSON: `{c['run_dir']}/fold_<i>/metrics.json`; per-gene CSV: "
                      f"`{Path(c['run_dir']).parent / 'per_gene.csv'}`.\n")
    if eff is not None or efficiency_also:
        md.append("## Table 1: efficiency\n")
    if eff is not None:
        md.extend(_efficiency_lines(eff))
    for d in efficiency_also:
        other = read_json(Path(d) / "efficiency.json")
        md.append(f"### Table 1 on {other['device']}\n")
        how = f"`{other['command']}`" if other.get("command") else "`hist-st bench efficiency`"
        md.append(f"Measured separately, not by this report's command: {how} (results in `{d}`).\n")
        md.extend(_efficiency_lines(other))
    if sca is not None:
        md.append("## Figure 3: scaling\n")
        md.append(f"Synthetic slides on {sca['device']}: spots varied at {sca['fixed_genes']} genes, genes varied at "
                  f"{sca['fixed_spots']} spots; {sca['epochs']} epoch(s); log-log axes.\n")
        failed = [f"{r['method']} ({r['axis']} axis, {r.get('n_spots')} spots, {r['n_genes']} genes: {r['error']})"
                  for r in sca["records"] if "error" in r]
        if failed:
            md.append("Not on the figure (failed or over the time limit; larger sizes of that axis were not tried): "
                      + "; ".join(failed) + ".\n")
        md.append(f"![Figure 3]({name}/{_copy(sca['figure'], fig_dir, 'scaling.png')})\n")
    if abl is not None:
        md.append("## Table 3: ablations\n")
        md.append(f"Every row of this table trains for {ablation_epochs or base_cfg.epochs} epochs "
                  f"(Table 2: {base_cfg.epochs}).\n")
        md.extend(_rows_lines(runs / "ablation"))
    if stn is not None:
        md.append("## Table 5: calibration token vs Macenko stain normalisation\n")
        md.extend(_rows_lines(runs / "stain"))
    if tok is not None:
        md.append("## Table 6 and Figure 4: calibration-token analysis\n")
        md.append((runs / "tokens" / "tokens.md").read_text() + "\n")
        for f in sorted((runs / "tokens").glob("token_pca_*.png")):
            md.append(f"![{f.stem}]({name}/{_copy(f, fig_dir)})\n")
    if gene_fig is not None:
        md.append("## Gene maps (appendix C)\n")
        md.append(f"Slide `{pred_files[0].stem}` (test slide of fold 0), genes with the highest HiST per-gene PCC "
                  f"(chosen after evaluation, for display only): measured and predicted expression over the H&E, "
                  f"library-size normalised (log1p of counts per 10k over the predicted genes).\n")
        md.append(f"![genes]({name}/{_copy(gene_fig, fig_dir, 'genes.png')})\n")
    curves = first_run / "loss_curves.png"
    if curves.is_file():
        md.append(f"HiST training loss per fold: ![loss]({name}/{_copy(curves, fig_dir, 'loss_curves.png')})\n")
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / f"{name}.md"
    path.write_text("\n".join(md))
    return path

