"""One command that reproduces the paper's tables on a cohort and writes ``docs/results/<name>.md``.

Steps (each reuses what ``runs_dir`` holds, unless ``force``): Table 2 (`run_accuracy`) for each gene set;
then on the first gene set Table 1 (`run_efficiency`, fold 0) and optionally Figure 3 (`run_scaling`), Table 3
(`run_ablation`), Table 5 (`run_stain`, with a Macenko-normalised copy of the cohort), Table 6 and Figure 4
(`run_token_analysis`, from the HiST fold models) and a gene figure (`plot_genes`, a test slide of fold 0).

The Markdown quotes the exact command, the package versions, the device and the time of each step.
Figures are copied beside it into ``docs/results/<name>/``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hist_st.bench.efficiency import Workers, run_efficiency
from hist_st.bench.scaling import run_scaling
from hist_st.cohort import CohortManifest, GeneSet
from hist_st.errors import InputError
from hist_st.experiments.ablation import run_ablation
from hist_st.experiments.accuracy import CVSetup, build_config, per_gene_rows, run_accuracy
from hist_st.experiments.stain import run_stain
from hist_st.experiments.tokens import run_token_analysis
from hist_st.jsonio import read_json
from hist_st.metrics import format_table
from hist_st.pl import plot_genes
from hist_st.runtime import package_versions

__all__ = ["ReportSpec", "build_report"]


def _rows_lines(run_dir: Path) -> list[str]:
    """Markdown of a HiST table run (Table 3 or 5): its ``table.md`` and HiST's recorded compute minutes."""
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
    methods: Sequence[str] = ("hist", "mean", "depth", "ridge", "mlp", "bleep", "stnet", "stflow")
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
    if not spec.gene_sets:
        raise InputError("--genes", "give at least one gene set")
    name, cohort, methods, first = spec.name, Path(spec.cohort), list(spec.methods), spec.gene_sets[0]
    runs = Path(spec.runs_dir) if spec.runs_dir is not None else Path("runs") / f"report-{name}"
    docs, reuse, timings = Path(spec.docs_dir), not spec.force, {}
    runs.mkdir(parents=True, exist_ok=True)

    def step(label: str, fn: Callable[[], Any]) -> Any:
        """Time ``fn`` (each step reuses what it computed before with the same key unless ``force``)."""
        t0 = time.perf_counter()
        res = fn()
        timings[label] = time.perf_counter() - t0
        return res

    acc = {g: step(f"Table 2 ({g})", lambda g=g: run_accuracy(
        [cohort], runs / f"accuracy-{GeneSet.parse(g).label}", methods=methods, genes=g, folds=spec.folds,
        seed=spec.seed, config=spec.config, overrides=list(spec.overrides), progress=spec.progress,
        baseline_options=dict(spec.baseline_options), reuse=reuse, reuse_from=spec.reuse_from,
        command=spec.command)) for g in spec.gene_sets}
    first_run = Path(next(iter(acc[first]["cohorts"].values()))["run_dir"])
    base_cfg = build_config(spec.config, spec.overrides)
    # threads: every method's worker uses HiST's
    workers = Workers(methods=methods, epochs=spec.efficiency_epochs, seed=spec.seed, device=spec.device,
                      config=spec.config, overrides=spec.overrides, progress=spec.progress,
                      threads=int(base_cfg.threads), baseline_options=spec.baseline_options)
    eff = sca = abl = stn = tok = gene_fig = None
    if spec.efficiency:
        eff = step("Table 1", lambda: run_efficiency(runs / "efficiency", workers=workers, cohort=cohort,
                                                     genes=first, folds=spec.folds, reuse=reuse))
    if spec.scaling:
        sizes = dict(spec.scaling_options)  # spots, genes_list (run_scaling); timeout, epochs (its workers)
        timed = dataclasses.replace(workers, epochs=int(sizes.pop("epochs", 1)),
                                    timeout=sizes.pop("timeout", 1800.0))
        sca = step("Figure 3", lambda: run_scaling(runs / "scaling", workers=timed, reuse=reuse, **sizes))
    setup = functools.partial(CVSetup, genes=first, folds=spec.folds, seed=spec.seed, config=spec.config,
                              progress=spec.progress)
    epochs = [f"epochs={spec.ablation_epochs}"] if spec.ablation_epochs else []
    if spec.ablations is None or len(spec.ablations) > 0:
        abl = step("Table 3", lambda: run_ablation(cohort, runs / "ablation", names=spec.ablations,
                                                   setup=setup(overrides=[*spec.overrides, *epochs]),
                                                   skip_done=reuse, reuse_from=[first_run]))
    if spec.macenko is not None:
        stn = step("Table 5", lambda: run_stain(cohort, spec.macenko, runs / "stain", skip_done=reuse,
                                                setup=setup(overrides=spec.overrides),
                                                reuse_from=[first_run, runs / "ablation" / "no-token"]))
    if "hist" in methods:
        tok = step("Table 6", lambda: run_token_analysis(first_run, cohort, runs / "tokens",
                                                         group_by=spec.token_groups))
    pred_files = sorted((first_run / "fold_0" / "predictions").glob("*.h5ad"))
    rows = [r for r in per_gene_rows(first_run) if r["method"] == "HiST" and r["pcc_mean"] is not None]
    genes = [r["gene"] for r in sorted(rows, key=lambda r: -r["pcc_mean"])[:3]] if pred_files else []
    if genes:  # the HiST genes with the highest mean per-gene PCC, for display
        truth = cohort / f"{pred_files[0].stem}.h5ad"
        gene_fig = step("gene figure", lambda: plot_genes(pred_files[0], genes, runs / "genes.png",
                                                         truth=truth if truth.is_file() else None))

    def figure(label: str, src: str | Path, file: str | None = None) -> str:
        """A Markdown image of ``src``, copied beside the report into ``docs/<name>/<file>``."""
        (docs / name).mkdir(parents=True, exist_ok=True)
        return f"![{label}]({name}/{shutil.copyfile(src, docs / name / (file or Path(src).name)).name})\n"

    md = [f"# HiST results: {name}\n", "Generated by:\n\n```\n"
          + (spec.command or f"hist-st report --name {name} --cohort {cohort}") + "\n```\n",
          f"Date: {_dt.datetime.now().isoformat(timespec='seconds')}. Cohort: `{cohort}`. Runs: `{runs}`. "
          "Versions: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()) + ".\n"]
    for label, path in (("Cohort", cohort), ("Macenko copy", spec.macenko)):
        m = CohortManifest.read(path) if path is not None else None
        if m is not None:
            patch, ids = m.get("patch") or {}, m.get("slide_ids", [])
            md.append(f"{label} `{path}`: {len(ids)} slides ({', '.join(ids)}), technology "
                      f"{m.get('technology')}, encoder(s) {', '.join(m.get('encoders', []))}, patches "
                      f"{patch.get('size_px')} px at {patch.get('um_per_px')} um/px, stain normalisation "
                      f"{m.get('stain_norm') or 'none'}.\n")
    md.append("Step times (this invocation; reused steps take ~0 s): "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ".\n")
    md += _table2_lines(spec, acc, base_cfg)
    if eff is not None or spec.efficiency_also:
        md += ["## Table 1: efficiency\n", *(_efficiency_lines(eff) if eff is not None else [])]
    for d in spec.efficiency_also:
        other = read_json(Path(d) / "efficiency.json")
        how = f"`{other['command']}`" if other.get("command") else "`hist-st bench efficiency`"
        md += [f"### Table 1 on {other['device']}\n",
               f"Measured separately, not by this report's command: {how} (results in `{d}`).\n",
               *_efficiency_lines(other)]
    if sca is not None:
        md += ["## Figure 3: scaling\n",
               f"Synthetic slides on {sca['device']}: spots varied at {sca['fixed_genes']} genes, genes "
               f"varied at {sca['fixed_spots']} spots; {sca['epochs']} epoch(s); log-log axes.\n"]
        failed = [f"{r['method']} ({r['axis']} axis, {r.get('n_spots')} spots, {r['n_genes']} genes: "
                  f"{r['error']})" for r in sca["records"] if "error" in r]
        if failed:
            md.append("Not on the figure (failed or over the time limit; larger sizes of that axis were not "
                      "tried): " + "; ".join(failed) + ".\n")
        md.append(figure("Figure 3", sca["figure"], "scaling.png"))
    if abl is not None:
        md += ["## Table 3: ablations\n", "Every row of this table trains for "
               f"{spec.ablation_epochs or base_cfg.epochs} epochs (Table 2: {base_cfg.epochs}).\n",
               *_rows_lines(runs / "ablation")]
    if stn is not None:
        md += ["## Table 5: calibration token vs Macenko stain normalisation\n", *_rows_lines(runs / "stain")]
    if tok is not None:
        md += ["## Table 6 and Figure 4: calibration-token analysis\n",
               (runs / "tokens" / "tokens.md").read_text() + "\n",
               *(figure(f.stem, f) for f in sorted((runs / "tokens").glob("token_pca_*.png")))]
    if gene_fig is not None:
        md += ["## Gene maps (appendix C)\n",
               f"Slide `{pred_files[0].stem}` (test slide of fold 0), genes with the highest HiST per-gene "
               "PCC (chosen after evaluation, for display only): measured and predicted expression over the "
               "H&E, library-size normalised (log1p of counts per 10k over the predicted genes).\n",
               figure("genes", gene_fig, "genes.png")]
    if (first_run / "loss_curves.png").is_file():
        md.append("HiST training loss per fold: "
                  + figure("loss", first_run / "loss_curves.png", "loss_curves.png"))
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{name}.md").write_text("\n".join(md))
    return docs / f"{name}.md"


def _table2_lines(spec: ReportSpec, acc: Mapping[str, Mapping[str, Any]], cfg: Any) -> list[str]:
    """Markdown of Table 2: protocols, HiST's settings, unused ``reuse_from`` folders, method options, and per
    gene set and cohort the table, wall times, devices, copied rows and where the per-fold results are."""
    md = ["## Table 2: accuracy\n",
          "Protocols: **pooled** = per-slide flattened N x G counts, averaged over test slides (HiST "
          "authors' metric, dominated by between-gene mean differences); **per-gene** = log1p Pearson/R2 per "
          f"gene over all test spots (HEST metric). Mean ± std over {spec.folds} folds by slide (seed "
          f"{spec.seed}); every method on the same folds, genes, targets and embeddings. HiST is evaluated "
          "at its final epoch; nothing is tuned on test folds.\n",
          f"HiST: {cfg.epochs} epochs, AdamW lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, "
          f"{cfg.slides_per_step} slide per step, configuration in each run's `config.yaml`.\n"]
    used = {src for a in acc.values() for c in a["cohorts"].values() for src in c.get("reused_from", {}).values()}
    unused = [str(Path(d)) for d in spec.reuse_from if str(Path(d)) not in used]
    if unused:
        md.append("Not used by Table 2 (no method there with the same cohort, folds, genes and options): "
                  + ", ".join(f"`{d}`" for d in unused) + ".\n")
    if spec.baseline_options:
        opts = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in o.items())
                         for m, o in spec.baseline_options.items())
        md.append("Method options given on the command line (every other setting is the method's published "
                  f"default, see `hist_st.methods`): {opts}.\n")
    for genes, a in acc.items():
        for cname, c in a["cohorts"].items():
            md += [f"### {cname}, genes {genes} ({c.get('n_genes')} genes)\n",
                   format_table(c["methods"]) + "\n"]
            if c.get("seconds"):
                md.append("Wall time over all folds (train + predict): "
                          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in c["seconds"].items()) + ".\n")
            by_device: dict[str, list[str]] = {}
            for method, dev in c.get("devices", {}).items():
                by_device.setdefault(dev or "not recorded", []).append(method)
            if by_device:
                md.append("Trained on: " + "; ".join(f"{', '.join(ms)}: {d}" for d, ms in by_device.items())
                          + ".\n")
            for method, src in c.get("reused_from", {}).items():
                src_rec = Path(src) / "accuracy.json"
                how = read_json(src_rec).get("command") if src_rec.is_file() else None
                made_by = f", made by `{how}`" if how else ""
                md.append(f"Row `{method}` copied from a separate run with the same cohort, folds, genes and "
                          f"options, not trained by this command: `{src}`{made_by}.\n")
            md.append(f"Per-fold JSON: `{c['run_dir']}/fold_<i>/metrics.json`; per-gene CSV: "
                      f"`{Path(c['run_dir']).parent / 'per_gene.csv'}`.\n")
    return md
