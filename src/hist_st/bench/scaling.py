"""Figure 3: time and memory of every method against spots (genes fixed) and against genes (spots fixed): the
Table 1 measurement (`hist_st.bench.efficiency.measure`, one fresh process per method and size) over synthetic
slides of each size, drawn on log-log axes (`hist_st.bench.plots.plot_scaling`).

```python
from hist_st.bench.efficiency import Workers
from hist_st.bench.scaling import run_scaling
fig3 = run_scaling("runs/scaling", workers=Workers(methods=["hist", "ridge"], epochs=1), spots=(500, 1000, 2000),
                   genes_list=(50, 500))
```
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hist_st.bench.efficiency import SyntheticSlides, Workers, reusable, timing_key
from hist_st.bench.plots import plot_scaling
from hist_st.jsonio import write_json

__all__ = ["run_scaling"]


def run_scaling(
    out_dir: str | Path, *, workers: Workers | None = None, spots: Sequence[int] = (250, 500, 1000, 2000, 4000),
    genes_list: Sequence[int] = (50, 250, 1000, 2000), fixed_genes: int = 250, fixed_spots: int = 1000,
    n_train: int = 2, reuse: bool = False,
) -> dict[str, Any]:
    """Figure 3 on synthetic slides (``n_train`` training + 1 test slide per size). A method that fails or
    times out at one size is not run at larger sizes of that axis.

    Args:
        out_dir: Output folder.
        workers: The methods and how each runs (`Workers`; default: every method, 1 epoch, 1800 s).
        spots, genes_list: Sizes along the spots axis and along the genes axis.
        fixed_genes, fixed_spots: Genes while spots vary; spots while genes vary.
        n_train: Synthetic training slides.
        reuse: Return ``out_dir/scaling.json`` instead of measuring when it records the same `timing_key`.

    Returns:
        ``{"records": [...], "figure": path, "out_dir": str, ...}``; ``scaling.json`` and ``scaling.png`` in
        ``out_dir``.
    """
    w = workers or Workers(epochs=1, timeout=1800.0)
    jobs = [("spots", int(n), int(fixed_genes)) for n in sorted(spots)]
    jobs += [("genes", int(fixed_spots), int(g)) for g in sorted(genes_list)]
    runs = [((axis, n, g), spec) for axis, n, g in jobs
            for spec in w.specs(SyntheticSlides(n_train, 1, n, g).data(w.seed))]
    out = Path(out_dir)
    key = timing_key([spec for _, spec in runs], timeout=w.timeout)
    if (prior := reusable(out / "scaling.json", key, reuse)) is not None:
        return prior
    records, failed = [], set()  # failed: (method, axis)
    for (axis, n, g), spec in tqdm(runs, desc="scaling", unit="run", disable=not w.progress):
        if (spec["method"], axis) in failed:
            continue
        rec = {**w.run(spec), "axis": axis, "target_spots": n, "n_genes": g}
        rec.setdefault("n_spots", n)
        if "error" in rec:
            failed.add((spec["method"], axis))
        records.append(rec)
    result = {"records": records, "figure": str(plot_scaling(records, out / "scaling.png")), "out_dir": str(out),
              **w.record(records), "key": key, "fixed_genes": fixed_genes, "fixed_spots": fixed_spots,
              "options": {"spots": [int(n) for n in spots], "genes_list": [int(g) for g in genes_list],
                          "timeout": w.timeout}}
    write_json(result, out / "scaling.json")
    return result
