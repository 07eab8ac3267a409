"""Log-log figures of the benchmarks: `plot_speed` (``bench speed``) and `plot_scaling` (paper Figure 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hist_st.pl import pyplot, save_figure

__all__ = ["plot_speed", "plot_scaling"]


def _loglog(ax: Any, series: Mapping[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str,
            colours: Mapping[str, Any] | None = None, ticks: Sequence[int] = (), title: str = "") -> None:
    """One log-log panel: a line per ``label -> [(x, y), ...]``; ``ticks``: label these x values only."""
    for label, pts in series.items():
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, "o-", lw=1.5, color=(colours or {}).get(label), label=label)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    if ticks:  # the measured sizes only (log-axis minor labels collide)
        ax.set_xticks(list(ticks), [str(x) for x in ticks])
        ax.xaxis.set_minor_formatter(pyplot().NullFormatter())
    fmt = pyplot().FormatStrFormatter("%g")  # 0.25, not 2.5 x 10^-1
    ax.yaxis.set_major_formatter(fmt)
    low, high = ax.get_ylim()
    if high < 10 * low:  # within one decade the minor ticks are the only labels
        ax.yaxis.set_minor_formatter(fmt)
    ax.grid(True, which="both", alpha=0.3)


def plot_speed(results: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """``speed_vs_spots.png`` and ``speed_vs_genes.png``: time and peak memory (CUDA reserved, else RSS) of
    `hist_st.bench.speed` records, per mode, at the sweep's fixed value of the other axis; an axis with fewer
    than two sizes gets no figure. Returns the figures written."""
    plt, ok, paths = pyplot(), [r for r in results if "error" not in r], []
    for axis, fixed in (("spots", "genes"), ("genes", "spots")):
        times, mems = {}, {}
        for mode in ("infer", "train"):
            vals = [r[fixed] for r in ok if r["mode"] == mode]
            keep = max(set(vals), key=vals.count) if vals else None  # the most common: the sweep's fixed value
            rows = [r for r in ok if r["mode"] == mode and r[fixed] == keep]
            if len(rows) >= 2:
                label = f"{mode} ({fixed}={keep})"
                times[label] = [(r[axis], r["seconds"]) for r in rows]
                mems[label] = [(r[axis], r.get("cuda_reserved_gb", r["peak_rss_gb"])) for r in rows]
        path = Path(out_dir) / f"speed_vs_{axis}.png"
        if not times:  # fewer than two sizes along this axis: no curve (and no stale figure of an earlier run)
            path.unlink(missing_ok=True)
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        sizes = sorted({x for pts in times.values() for x, _ in pts})
        for ax, series, ylabel in zip(axes, (times, mems), ("seconds per slide", "peak memory (GB)")):
            _loglog(ax, series, axis, ylabel, ticks=sizes)
            ax.legend()
        fig.suptitle(f"HiST time and memory vs {axis}")
        fig.tight_layout()
        paths.append(save_figure(fig, path, dpi=120))
    return paths


def plot_scaling(records: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Figure 3: train and inference time (top) and peak memory (bottom) against spots and genes, log-log.

    Args:
        records: Dicts with ``method``, ``axis`` (``"spots"`` or ``"genes"``), ``n_spots``, ``n_genes``,
            ``train_s_per_slide``, ``infer_s_per_slide``, ``train_mem_gb``, ``infer_mem_gb``; failed
            runs (``error``) or missing values are left out.
        out: PNG path.
    """
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), dpi=120)
    methods = sorted({r["method"] for r in records}, key=lambda m: (m != "hist", m))
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for c, (axis, phase) in enumerate([("spots", "train"), ("spots", "infer"), ("genes", "train"), ("genes", "infer")]):
        xkey, xlabel = ("n_spots", "spots per slide") if axis == "spots" else ("n_genes", "genes")
        ticks = sorted({rec[xkey] for rec in records if rec["axis"] == axis and "error" not in rec})
        for r, (key, ylabel) in enumerate(((f"{phase}_s_per_slide", f"{phase} s/slide"),
                                           (f"{phase}_mem_gb", f"{phase} memory GB (CPU: ΔRSS)"))):
            series = {m: [(rec[xkey], rec[key]) for rec in records if rec["method"] == m and rec["axis"] == axis
                          and rec.get(key) is not None and rec[key] > 0] for m in methods}
            _loglog(axes[r, c], series, xlabel, ylabel, colour, ticks, f"{phase} / {axis}")
    legend = {label: h for ax in axes.ravel() for h, label in zip(*ax.get_legend_handles_labels())}
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save_figure(fig, out, dpi=120)
