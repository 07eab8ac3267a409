"""Table 1 (time per slide and peak memory) and Figure 3 (scaling with spots and genes) for every method.

Each (method, data size) is measured in its own Python subprocess, so one method's allocations, caches
and imports never count against another's, and a crash or timeout is recorded instead of stopping the
run. Inside the worker:

- **time**: ``fit`` wall time divided by (training slides x epochs) gives train seconds per slide (methods
  without epochs, such as ``ridge`` and ``mean``, count one pass); inference seconds per slide is the mean
  over the test slides after one untimed warm-up prediction;
- **memory on CUDA**: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the fit and
  (after ``empty_cache`` and a reset) over inference;
- **memory on CPU**: resident set size sampled every 2 ms by a thread (psutil) during the fit and during
  inference; reported as the peak and as the increase over the RSS just before (data and imports are
  already loaded, so the increase isolates the method). The allocator may reuse memory freed after the
  fit, so the CPU inference increase is a lower bound;
- **per 1k spots**: the memory increase (CPU) or reserved peak (CUDA) divided by the largest training
  slide's spots / 1000 (the paper normalises by the peak number of spots).

```python
from hist_st.experiments import run_efficiency, run_scaling
from hist_st.experiments.efficiency import Workers
t1 = run_efficiency("runs/eff", workers=Workers(methods=["hist", "stflow"]), cohort="cohorts/her2st", genes="hvg:2000")
fig3 = run_scaling("runs/scaling", workers=Workers(methods=["hist", "ridge"], epochs=1), spots=(500, 1000, 2000),
                   genes_list=(50, 500))
```
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hist_st.data.synthetic import ENCODER, cohort_params, make_slide
from hist_st.errors import InputError
from hist_st.evaluate.cache import digest
from hist_st.experiments.accuracy import _check_methods, build_config
from hist_st.experiments.figures import plot_scaling
from hist_st.jsonio import read_json, write_json
from hist_st.methods import get_method, method_option_names
from hist_st.runtime import device_name, resolve_device, set_threads
from hist_st.train.config import GeneConfig
from hist_st.train.data import embedding_key, list_slides, load_slides, read_manifest, select_genes
from hist_st.train.folds import make_folds
from hist_st.train.loop import train as train_hist
from hist_st.train.predict import predict_log1p

__all__ = ["measure", "run_worker", "run_efficiency", "run_scaling", "format_efficiency_table",
           "timing_key", "Workers"]

GB = 1024.0**3


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so that a phase's RSS increase counts its
    own allocations rather than being hidden by memory an earlier phase freed but the allocator kept."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS deltas may undercount reused memory
        pass


class _RSSSampler:
    """Peak resident set size of this process while the context is open (psutil, every ``interval`` s)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> _RSSSampler:
        gc.collect()
        _release_free_memory()
        self.before = self.proc.memory_info().rss
        self.peak = self.before
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _resolve_device(device: str) -> str:
    """``auto`` as the device type it stands for here (``cuda`` or ``cpu``); other names as given, checked."""
    resolved = resolve_device(device)
    return resolved.type if device == "auto" else device


def timing_key(specs: Sequence[Mapping[str, Any]], **settings: Any) -> str:
    """What a set of worker ``specs`` measures, as a `hist_st.evaluate.cache.digest`: every spec with its
    cohort path resolved and without baseline ``epochs`` options (`measure` times its own epochs, and time is
    reported per epoch), plus ``settings`` (e.g. the timeout). Recorded as ``key`` in ``efficiency.json`` /
    ``scaling.json``; a run with the same key reuses the file."""
    timed = []
    for spec in specs:
        data = dict(spec["data"])
        if "cohort" in data:
            data["cohort"] = str(Path(data["cohort"]).resolve())
        opts = {k: v for k, v in dict(spec.get("baseline_options", {})).items() if k != "epochs"}
        timed.append({**spec, "data": data, "baseline_options": opts})
    return digest({"specs": timed, **settings})


def _reusable(path: Path, key: str, reuse: bool) -> dict[str, Any] | None:
    """The result at ``path`` when ``reuse`` and it was measured with ``key``."""
    if not (reuse and path.is_file()):
        return None
    prior = read_json(path)
    return prior if prior.get("key") == key else None


def synthetic_patch_source(size_px: int = 32) -> Any:
    """A `hist_st.methods.PatchSource` of random uint8 patches (seeded by slide id), for timing ST-Net on
    synthetic slides that have no H&E image; the network's cost does not depend on the pixel values."""
    import zlib

    def source(slide: Any) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(slide.slide_id.encode()))
        return rng.integers(0, 256, size=(slide.n_spots, size_px, size_px, 3), dtype=np.uint8)

    return source


def _load_data(data: Mapping[str, Any]) -> tuple[list[Any], list[Any], list[str], str]:
    """Training slides, test slides, genes and embedding key for a worker spec."""
    if "synthetic" in data:

        p = dict(data["synthetic"])
        n_genes, embed_dim, seed = int(p["n_genes"]), int(p.get("embed_dim", 64)), int(p.get("seed", 0))
        params = cohort_params(seed, n_genes, embed_dim, 5)
        grid = p.get("grid", "hex")
        n = int(p["n_train"]) + int(p["n_test"])
        slides = [make_slide(f"eff{i:02d}", int(p["n_spots"]), grid, seed + i, n_genes, embed_dim, f"P{i}",
                             cohort_seed=seed, params=params) for i in range(n)]
        genes = [str(g) for g in slides[0].genes]
        return slides[: int(p["n_train"])], slides[int(p["n_train"]) :], genes, ENCODER

    cohort = data["cohort"]
    train = load_slides(cohort, data["train"])
    test = load_slides(cohort, data["test"])
    genes = data.get("gene_list") or select_genes(train + test, GeneConfig.from_spec(data["genes"]), read_manifest(cohort))
    return train, test, list(genes), embedding_key(train + test, data.get("embedding"))


def measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Fit and time one method on one data set in this process (call it in a fresh process).

    Args:
        spec: ``method``; ``data`` (``{"cohort", "train", "test", "genes"}`` or ``{"synthetic": {n_train,
            n_test, n_spots, n_genes, embed_dim, seed}}``); ``epochs``; ``overrides`` (HiST config);
            ``baseline_options``; ``device``; ``threads``; ``seed``.

    Returns:
        The measurement record (see the module docstring for the definitions).
    """
    import torch

    set_threads(int(spec.get("threads", 0)))
    device = _resolve_device(str(spec.get("device", "auto")))
    cuda = device.startswith("cuda")
    method = str(spec["method"])
    seed = int(spec.get("seed", 0))
    epochs = int(spec.get("epochs", 2))
    train, test, genes, emb = _load_data(spec["data"])
    rec: dict[str, Any] = {
        "method": method, "device": device, "device_name": device_name(device), "n_genes": len(genes),
        "n_train_slides": len(train), "n_test_slides": len(test),
        "max_train_spots": max(s.n_spots for s in train), "n_spots": int(np.mean([s.n_spots for s in train + test])),
        "embedding": emb,
    }

    if method == "hist":

        cfg = build_config(None, [*spec.get("overrides", []), f"epochs={epochs}", "progress=false",
                                  f"device={device}", f"embedding={emb}"], seed=seed)
        passes = epochs

        def fit() -> Any:
            return train_hist(cfg, train, genes=genes).bundle

        def predict(model: Any, slide: Any) -> np.ndarray:
            return predict_log1p(model, slide)[0]
    else:

        opts = dict(spec.get("baseline_options", {}) or {})
        params = method_option_names(method)
        if "epochs" in params:  # the timed epochs, whatever the accuracy runs used (time is per epoch)
            opts["epochs"] = epochs
        if "device" in params:
            opts.setdefault("device", device)
        if method == "stnet" and "synthetic" in spec["data"]:
            opts.setdefault("patches", synthetic_patch_source())
        passes = int(opts.get("epochs", 1)) if "epochs" in params else 1

        def fit() -> Any:
            return get_method(method, **opts).fit(train, genes, embedding_key=emb, seed=seed)

        def predict(model: Any, slide: Any) -> np.ndarray:
            return model.predict(slide)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with _RSSSampler() as rss:
        t0 = time.perf_counter()
        model = fit()
        sync()
        fit_s = time.perf_counter() - t0
    rec.update(fit_s=fit_s, epochs=passes, train_s_per_slide=fit_s / (len(train) * passes),
               train_rss_peak_gb=rss.peak / GB, train_rss_delta_gb=(rss.peak - rss.before) / GB)
    if cuda:
        rec.update(train_alloc_gb=torch.cuda.max_memory_allocated() / GB,
                   train_reserved_gb=torch.cuda.max_memory_reserved() / GB)

    predict(model, test[0])  # warm-up (not timed)
    sync()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with _RSSSampler() as rss:
        t0 = time.perf_counter()
        for s in test:
            predict(model, s)
        sync()
        infer_s = time.perf_counter() - t0
    rec.update(infer_s_per_slide=infer_s / len(test), infer_rss_peak_gb=rss.peak / GB,
               infer_rss_delta_gb=(rss.peak - rss.before) / GB)
    if cuda:
        rec.update(infer_alloc_gb=torch.cuda.max_memory_allocated() / GB,
                   infer_reserved_gb=torch.cuda.max_memory_reserved() / GB)
        rec["train_mem_gb"], rec["infer_mem_gb"] = rec["train_reserved_gb"], rec["infer_reserved_gb"]
    else:
        rec["train_mem_gb"], rec["infer_mem_gb"] = rec["train_rss_delta_gb"], rec["infer_rss_delta_gb"]
    rec["train_mem_gb_per_1k"] = rec["train_mem_gb"] / (rec["max_train_spots"] / 1000.0)
    return rec


def run_worker(spec: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run `measure` in a fresh ``python -m hist_st.experiments.efficiency`` process.

    Returns:
        The measurement record, or ``{"method", "error": str}`` on failure or timeout.
    """
    with tempfile.TemporaryDirectory(prefix="hist-st-eff-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec, default=str))
        cmd = [sys.executable, "-m", "hist_st.experiments.efficiency", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"method": spec["method"], "error": f"timeout after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return {"method": spec["method"], "error": f"exit {proc.returncode}: " + " | ".join(tail)}
        return json.loads(out_path.read_text())


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def format_efficiency_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown Table 1: train/infer seconds per slide and peak memory (per 1k training spots)."""
    cuda = any(str(r.get("device", "")).startswith("cuda") for r in records)
    if cuda:
        head = "| Method | Train (s/slide) | Infer (s/slide) | Allocated GB (GB/1k) | Reserved GB (GB/1k) | Infer reserved GB |"
    else:
        head = "| Method | Train (s/slide) | Infer (s/slide) | Train peak RSS GB | Train ΔRSS GB (GB/1k) | Infer ΔRSS GB |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | |")
            continue
        k = r["max_train_spots"] / 1000.0
        if cuda:
            mem = [f"{_fmt(r['train_alloc_gb'], 2)} ({_fmt(r['train_alloc_gb'] / k, 2)})",
                   f"{_fmt(r['train_reserved_gb'], 2)} ({_fmt(r['train_reserved_gb'] / k, 2)})",
                   _fmt(r.get("infer_reserved_gb"), 2)]
        else:
            mem = [_fmt(r["train_rss_peak_gb"], 2), f"{_fmt(r['train_rss_delta_gb'], 3)} ({_fmt(r['train_mem_gb_per_1k'], 3)})",
                   _fmt(r["infer_rss_delta_gb"], 3)]
        lines.append(f"| {r['method']} | {_fmt(r['train_s_per_slide'])} | {_fmt(r['infer_s_per_slide'])} | " + " | ".join(mem) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Workers:
    """How every timed method runs, each in its own worker process (Table 1 and Figure 3).

    Attributes:
        methods: Methods to time (``hist`` and `hist_st.methods` names).
        epochs: Training epochs timed for methods with epochs (time is reported per slide per epoch).
        seed: Seed of the slides (synthetic slides, or the folds that pick a cohort's fold 0) and of training.
        overrides: HiST config overrides (e.g. ``model.dim=256``).
        baseline_options: Per-baseline options.
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: torch threads in each worker (0 = default).
        timeout: Seconds per method (and size) before it is recorded as a timeout.
        progress: Progress bar.
    """

    methods: Sequence[str] = ("hist", "mean", "ridge", "mlp", "bleep", "stnet", "stflow")
    epochs: int = 2
    seed: int = 0
    overrides: Sequence[str] = ()
    baseline_options: Mapping[str, Mapping[str, Any]] | None = None
    device: str = "auto"
    threads: int = 0
    timeout: float | None = 3600.0
    progress: bool = True

    def specs(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One `measure` spec per method on ``data`` (checked method names, the device resolved here)."""
        device = _resolve_device(self.device)
        return [{"method": m, "data": dict(data), "epochs": self.epochs, "overrides": list(self.overrides),
                 "seed": self.seed, "baseline_options": dict((self.baseline_options or {}).get(m, {})),
                 "device": device, "threads": self.threads} for m in _check_methods(self.methods)]

    def record(self) -> dict[str, Any]:
        """The settings recorded beside the results."""
        return {"methods": _check_methods(self.methods), "epochs": self.epochs, "overrides": list(self.overrides),
                "threads": self.threads, "seed": self.seed}


def run_efficiency(
    out_dir: str | Path,
    *,
    workers: Workers | None = None,
    cohort: str | Path | None = None,
    genes: str = "hvg:2000",
    folds: int = 4,
    n_spots: int = 2000,
    n_genes: int = 2000,
    n_train: int = 3,
    n_test: int = 1,
    command: str | None = None,
    reuse: bool = False,
) -> dict[str, Any]:
    """Table 1: every method on the same training and test slides, each in its own process.

    Args:
        out_dir: Output: ``efficiency.json``, ``table.md``.
        workers: The methods and how each runs (`Workers`; default: every method, 2 epochs, 3600 s).
        cohort: A prepared cohort: its fold-0 split (``make_folds(k=folds, workers.seed)``) gives the
            training and test slides, ``genes`` the gene set. None: a synthetic cohort of
            ``n_train + n_test`` slides of ``n_spots`` spots and ``n_genes`` genes.
        genes, folds: Gene set and fold count on a cohort.
        n_spots, n_genes, n_train, n_test: The synthetic slides.
        command: The command line, recorded in ``efficiency.json``.
        reuse: Return ``out_dir/efficiency.json`` instead of measuring when it records the same `timing_key`.

    Returns:
        ``{"records": [...], "table": str, "device": str, "out_dir": str}``.
    """
    w = workers or Workers()
    if cohort is not None:
        f0 = make_folds([p.stem for p in list_slides(cohort)], folds, w.seed)[0]
        data: dict[str, Any] = {"cohort": str(cohort), "train": f0["train"], "test": f0["test"], "genes": genes,
                                "embedding": build_config(None, w.overrides).embedding}
        where = f"{Path(cohort).name}, fold 0 of {folds} (seed {w.seed}), genes {genes}"
    else:
        data = {"synthetic": {"n_train": n_train, "n_test": n_test, "n_spots": n_spots, "n_genes": n_genes,
                              "embed_dim": 64, "seed": w.seed}}
        where = f"synthetic: {n_train} training + {n_test} test slides of ~{n_spots} spots, {n_genes} genes"
    specs = w.specs(data)
    out = Path(out_dir)
    key = timing_key(specs, timeout=w.timeout)
    prior = _reusable(out / "efficiency.json", key, reuse)
    if prior is not None:
        return prior
    records = [run_worker(s, w.timeout) for s in tqdm(specs, desc="efficiency", unit="method", disable=not w.progress)]
    names = [r.get("device_name") for r in records if r.get("device_name")]
    device = _resolve_device(w.device)
    dev = names[0] if names else device
    table = format_efficiency_table(records)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"Efficiency (Table 1) on {dev}. Data: {where}. {w.epochs} training epoch(s) per method with epochs; "
              "train time per slide per epoch, inference time per slide (after one warm-up slide); memory "
              + ("CUDA peak allocated/reserved" if device.startswith("cuda") else "resident set size (RSS) of "
                 "a separate process per method; ΔRSS = peak minus RSS before the fit/predict")
              + "; GB/1k = per 1,000 spots of the largest training slide.")
    (out / "table.md").write_text(header + "\n\n" + table + "\n")
    result = {"records": records, "table": table, "device": dev, "where": where, "out_dir": str(out),
              "header": header, **w.record(), "command": command, "key": key}
    write_json(result, out / "efficiency.json")
    return result


def run_scaling(
    out_dir: str | Path,
    *,
    workers: Workers | None = None,
    spots: Sequence[int] = (250, 500, 1000, 2000, 4000),
    genes_list: Sequence[int] = (50, 250, 1000, 2000),
    fixed_genes: int = 250,
    fixed_spots: int = 1000,
    n_train: int = 2,
    reuse: bool = False,
) -> dict[str, Any]:
    """Figure 3: time and memory against spots (genes fixed) and against genes (spots fixed), every method on
    the same synthetic slides and the same log-log axes. A method that fails or times out at one size is
    not run at larger sizes of that axis.

    Args:
        out_dir: Output folder.
        workers: The methods and how each runs (`Workers`; default: every method, 1 epoch, 1800 s).
        spots, genes_list: Sizes along the spots axis and along the genes axis.
        fixed_genes, fixed_spots: Genes while spots vary; spots while genes vary.
        n_train: Synthetic training slides.
        reuse: Return ``out_dir/scaling.json`` instead of measuring when it records the same `timing_key`.

    Returns:
        ``{"records": [...], "figure": path, "out_dir": str}``; ``scaling.json`` and ``scaling.png`` in
        ``out_dir``.
    """
    w = workers or Workers(epochs=1, timeout=1800.0)
    jobs = [("spots", int(n), int(fixed_genes)) for n in sorted(spots)]
    jobs += [("genes", int(fixed_spots), int(g)) for g in sorted(genes_list)]
    specs = {(axis, n, g): w.specs({"synthetic": {"n_train": n_train, "n_test": 1, "n_spots": n, "n_genes": g,
                                                  "embed_dim": 64, "seed": w.seed}}) for axis, n, g in jobs}
    out = Path(out_dir)
    key = timing_key([s for job in specs.values() for s in job], timeout=w.timeout)
    prior = _reusable(out / "scaling.json", key, reuse)
    if prior is not None:
        return prior
    records: list[dict[str, Any]] = []
    failed: set[tuple[str, str]] = set()
    bar = tqdm(total=sum(map(len, specs.values())), desc="scaling", unit="run", disable=not w.progress)
    for (axis, n, g), job in specs.items():
        for spec in job:
            bar.update(1)
            if (spec["method"], axis) in failed:
                continue
            rec = run_worker(spec, w.timeout)
            rec.update(axis=axis, target_spots=n, n_genes=g)
            rec.setdefault("n_spots", n)
            if "error" in rec:
                failed.add((spec["method"], axis))
            records.append(rec)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_scaling(records, out / "scaling.png")
    names = [r.get("device_name") for r in records if r.get("device_name")]
    result = {"records": records, "figure": str(fig), "out_dir": str(out),
              "device": names[0] if names else _resolve_device(w.device), **w.record(), "key": key,
              "fixed_genes": fixed_genes, "fixed_spots": fixed_spots,
              "options": {"spots": [int(n) for n in spots], "genes_list": [int(g) for g in genes_list],
                          "timeout": w.timeout}}
    write_json(result, out / "scaling.json")
    return result


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m hist_st.experiments.efficiency SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    try:
        rec = measure(spec)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    Path(argv[1]).write_text(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
