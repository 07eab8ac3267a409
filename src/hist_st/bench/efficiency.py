"""Table 1: time per slide and peak memory of every method on the same slides (Figure 3 repeats it over sizes,
`hist_st.bench.scaling`), each (method, data size) in its own process (`hist_st.bench.harness.run_isolated`; a
crash or timeout is recorded), built by `hist_st.methods.get_method` and timed through ``fit`` / ``predict``.

The table's header (`run_efficiency`) defines its quantities; besides, methods without epochs count one pass,
and memory is one `hist_st.bench.harness.PeakMemory` phase each for the fit and for inference after the data
is loaded (the allocator may reuse memory freed after the fit: the CPU inference ΔRSS is a lower bound).

```python
from hist_st.bench.efficiency import Workers, run_efficiency
t1 = run_efficiency("runs/eff", workers=Workers(methods=["hist", "stflow"]), cohort="cohorts/her2st", genes="hvg:2000")
```
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hist_st.bench import markdown_table
from hist_st.bench.harness import PeakMemory, run_isolated, timed_steps
from hist_st.data.synthetic import ENCODER, cohort_params, make_slide
from hist_st.evaluate.cache import digest, file_digest
from hist_st.jsonio import read_json, write_json
from hist_st.methods import Method, check_methods, get_method, method_option_names
from hist_st.runtime import device_name, resolve_device, set_threads
from hist_st.train.config import GeneConfig, load_config, with_gene_set
from hist_st.train.data import embedding_key, list_slides, load_slides, read_manifest, select_genes
from hist_st.train.folds import make_folds

__all__ = ["Workers", "SyntheticSlides", "measure", "run_efficiency", "format_efficiency_table", "timing_key"]


def _device_type(device: str) -> str:
    """``auto`` as the device type it stands for here (``cuda`` or ``cpu``); other names as given, checked."""
    resolved = resolve_device(device)
    return resolved.type if device == "auto" else device


#: How memory and time are measured (`hist_st.bench.harness`): 2 = GB of 10^9 bytes, the exact per-phase peak
#: (1: GiB from a sampling thread).
HARNESS = 2


def timing_key(specs: Sequence[Mapping[str, Any]], **settings: Any) -> str:
    """What a set of worker ``specs`` measures, as a `hist_st.evaluate.cache.digest` of every spec (its
    cohort path resolved, without baseline ``epochs`` options: `measure` times its own epochs), ``settings``
    (e.g. the timeout) and `HARNESS`. Recorded as ``key`` in ``efficiency.json`` / ``scaling.json``; a run
    with the same key reuses the file."""
    timed = []
    for spec in specs:
        data = dict(spec["data"])
        if "cohort" in data:
            data["cohort"] = str(Path(data["cohort"]).resolve())
        opts = {k: v for k, v in dict(spec.get("baseline_options", {})).items() if k != "epochs"}
        config = {"config": file_digest(spec["config"])} if spec.get("config") else {}  # its content counts
        timed.append({**spec, "data": data, "baseline_options": opts, **config})
    return digest({"specs": timed, "harness": HARNESS, **settings})


def reusable(path: Path, key: str, reuse: bool) -> dict[str, Any] | None:
    """The result at ``path`` when ``reuse`` and it was measured with ``key`` (a `timing_key`)."""
    prior = read_json(path) if reuse and path.is_file() else None
    return prior if prior is not None and prior.get("key") == key else None


def _random_patches(slide: Any) -> np.ndarray:
    """A `hist_st.methods.PatchSource`: random uint8 patches ``[N, 32, 32, 3]`` (seeded by slide id), to time
    ST-Net on synthetic slides, which have no H&E image (the network's cost does not depend on the pixels)."""
    rng = np.random.default_rng(zlib.crc32(slide.slide_id.encode()))
    return rng.integers(0, 256, size=(slide.n_spots, 32, 32, 3), dtype=np.uint8)


@dataclass(frozen=True)
class SyntheticSlides:
    """Synthetic slides to time on instead of a cohort: ``n_train`` + ``n_test`` slides of ``n_spots`` spots
    and ``n_genes`` genes (64-d embeddings; `hist_st.data.synthetic`, seeded by the workers' seed)."""

    n_train: int = 3
    n_test: int = 1
    n_spots: int = 2000
    n_genes: int = 2000

    def data(self, seed: int) -> dict[str, Any]:
        """The ``data`` entry of a worker spec."""
        return {"synthetic": {**asdict(self), "embed_dim": 64, "seed": seed}}


def _load_data(data: Mapping[str, Any]) -> tuple[list[Any], list[Any], list[str], str]:
    """Training slides, test slides, genes and embedding key for a worker spec."""
    if "synthetic" in data:
        p = {k: int(v) for k, v in data["synthetic"].items()}  # SyntheticSlides.data
        params = cohort_params(p["seed"], p["n_genes"], p["embed_dim"], 5)
        slides = [make_slide(f"eff{i:02d}", p["n_spots"], "hex", p["seed"] + i, p["n_genes"], p["embed_dim"],
                             f"P{i}", cohort_seed=p["seed"], params=params)
                  for i in range(p["n_train"] + p["n_test"])]
        return slides[: p["n_train"]], slides[p["n_train"] :], [str(g) for g in slides[0].genes], ENCODER
    cohort = data["cohort"]
    train, test = load_slides(cohort, data["train"]), load_slides(cohort, data["test"])
    genes = select_genes(train + test, GeneConfig.from_spec(data["genes"]), read_manifest(cohort))
    return train, test, list(genes), embedding_key(train + test, data.get("embedding"))


def _method(spec: Mapping[str, Any], device: str, emb: str) -> tuple[Method, int]:
    """The spec's method with the timed epochs, and how many passes over the training slides its fit makes."""
    name, epochs = str(spec["method"]), int(spec.get("epochs", 2))
    if name == "hist":  # HiST's option is a TrainConfig: the timed epochs and the device go into it
        overrides = [*spec.get("overrides", []), f"epochs={epochs}", "progress=false", f"device={device}",
                     f"embedding={emb}"]
        return get_method("hist", config=load_config(spec.get("config"), with_gene_set(overrides))), epochs
    params, given = method_option_names(name), dict(spec.get("baseline_options") or {})
    defaults = {"device": device, "patches": _random_patches if "synthetic" in spec["data"] else None}
    opts = {**{k: v for k, v in defaults.items() if k in params and v is not None}, **given}
    if "epochs" in params:  # the timed epochs, whatever the accuracy runs used (time is per epoch)
        opts["epochs"] = epochs
    return get_method(name, **opts), epochs if "epochs" in params else 1


def measure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Fit and time one method on one data set in this process (`run_efficiency` calls it in a fresh one).

    Args:
        spec: ``method``; ``data`` (``{"cohort", "train", "test", "genes"}`` or `SyntheticSlides.data`);
            ``epochs``; ``overrides`` (HiST config); ``baseline_options``; ``device``; ``threads``; ``seed``.

    Returns:
        The measurement record.
    """
    set_threads(int(spec.get("threads", 0)))
    device = _device_type(str(spec.get("device", "auto")))
    train, test, genes, emb = _load_data(spec["data"])
    model, passes = _method(spec, device, emb)
    rec: dict[str, Any] = {
        "method": str(spec["method"]), "device": device, "device_name": device_name(device), "n_genes": len(genes),
        "n_train_slides": len(train), "n_test_slides": len(test), "max_train_spots": max(s.n_spots for s in train),
        "n_spots": int(np.mean([s.n_spots for s in train + test])), "embedding": emb,
    }
    with PeakMemory(device) as mem:
        (fit_s,) = timed_steps(lambda: model.fit(train, genes, embedding_key=emb, seed=int(spec.get("seed", 0))),
                               device, repeats=1, warmup=0)
    rec.update(fit_s=fit_s, epochs=passes, train_s_per_slide=fit_s / (len(train) * passes), **mem.record("train_"))
    model.predict(test[0])  # warm-up (not timed)
    with PeakMemory(device) as mem:
        (infer_s,) = timed_steps(lambda: [model.predict(s) for s in test], device, repeats=1, warmup=0)
    rec.update(infer_s_per_slide=infer_s / len(test), **mem.record("infer_"))
    used = "reserved_gb" if mem.cuda else "rss_delta_gb"  # what Table 1 and Figure 3 call memory
    rec.update(train_mem_gb=rec[f"train_{used}"], infer_mem_gb=rec[f"infer_{used}"])
    rec["train_mem_gb_per_1k"] = rec["train_mem_gb"] / (rec["max_train_spots"] / 1000.0)
    return rec


worker = measure  # the entry `hist_st.bench.harness.run_isolated` calls in the fresh process


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def format_efficiency_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown Table 1: train/infer seconds per slide and peak memory (per 1k training spots)."""
    cuda = any(str(r.get("device", "")).startswith("cuda") for r in records)
    mem_head = (["Allocated GB (GB/1k)", "Reserved GB (GB/1k)", "Infer reserved GB"] if cuda
                else ["Train peak RSS GB", "Train ΔRSS GB (GB/1k)", "Infer ΔRSS GB"])
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["method"], f"failed: {r['error'][:80]}", "", "", "", ""])
            continue
        k = r["max_train_spots"] / 1000.0
        if cuda:
            mem = [f"{_fmt(r['train_alloc_gb'], 2)} ({_fmt(r['train_alloc_gb'] / k, 2)})",
                   f"{_fmt(r['train_reserved_gb'], 2)} ({_fmt(r['train_reserved_gb'] / k, 2)})",
                   _fmt(r.get("infer_reserved_gb"), 2)]
        else:
            mem = [_fmt(r["train_rss_peak_gb"], 2), f"{_fmt(r['train_rss_delta_gb'], 3)} ({_fmt(r['train_mem_gb_per_1k'], 3)})",
                   _fmt(r["infer_rss_delta_gb"], 3)]
        rows.append([r["method"], _fmt(r["train_s_per_slide"]), _fmt(r["infer_s_per_slide"]), *mem])
    return "\n".join(markdown_table(["Method", "Train (s/slide)", "Infer (s/slide)", *mem_head], rows))


@dataclass(frozen=True)
class Workers:
    """How every timed method runs, each in its own worker process (Table 1 and Figure 3).

    Attributes:
        methods: Methods to time (`hist_st.methods` names, ``hist`` included).
        epochs: Training epochs timed for methods with epochs (time is reported per slide per epoch).
        seed: Seed of the slides (synthetic slides, or the folds that pick a cohort's fold 0) and of training.
        config: HiST `TrainConfig` YAML (None: defaults), under ``overrides``.
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
    config: str | Path | None = None
    overrides: Sequence[str] = ()
    baseline_options: Mapping[str, Mapping[str, Any]] | None = None
    device: str = "auto"
    threads: int = 0
    timeout: float | None = 3600.0
    progress: bool = True

    def specs(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One `measure` spec per method on ``data`` (checked method names, the device resolved here)."""
        device = _device_type(self.device)
        return [{"method": m, "data": dict(data), "epochs": self.epochs, "overrides": list(self.overrides),
                 "seed": self.seed, "baseline_options": dict((self.baseline_options or {}).get(m, {})),
                 "device": device, "threads": self.threads, **self._config()} for m in check_methods(self.methods)]

    def _config(self) -> dict[str, str]:
        """``{"config": absolute path}`` when a YAML is given, else nothing (keys of earlier runs stay)."""
        return {"config": str(Path(self.config).resolve())} if self.config else {}

    def run(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """`measure` of ``spec`` in a fresh process with this timeout; ``{"method", "error"}`` on failure."""
        return run_isolated("hist_st.bench.efficiency", spec, timeout=self.timeout, label={"method": spec["method"]})

    def record(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The settings recorded beside ``records``, and the device they ran on in words."""
        names = [r.get("device_name") for r in records if r.get("device_name")]
        return {"device": names[0] if names else _device_type(self.device),
                "methods": check_methods(self.methods), "epochs": self.epochs, "overrides": list(self.overrides),
                "threads": self.threads, "seed": self.seed, **self._config()}


def run_efficiency(
    out_dir: str | Path, *, workers: Workers | None = None, cohort: str | Path | None = None,
    genes: str = "hvg:2000", folds: int = 4, synthetic: SyntheticSlides | None = None,
    command: str | None = None, reuse: bool = False,
) -> dict[str, Any]:
    """Table 1: every method on the same training and test slides, each in its own process.

    Args:
        out_dir: Output: ``efficiency.json``, ``table.md``.
        workers: The methods and how each runs (`Workers`; default: every method, 2 epochs, 3600 s).
        cohort: A prepared cohort: its fold-0 split (``make_folds(k=folds, workers.seed)``) gives the
            training and test slides, ``genes`` the gene set. None: the ``synthetic`` slides.
        genes, folds: Gene set and fold count on a cohort.
        synthetic: The slides without a cohort (default `SyntheticSlides()`).
        command: The command line, recorded in ``efficiency.json``.
        reuse: Return ``out_dir/efficiency.json`` instead of measuring when it records the same `timing_key`.

    Returns:
        ``{"records": [...], "table": str, "device": str, "where": str, "header": str, "key": str, ...}``.
    """
    w = workers or Workers()
    if cohort is not None:
        f0 = make_folds([p.stem for p in list_slides(cohort)], folds, w.seed)[0]
        data: dict[str, Any] = {"cohort": str(cohort), "train": f0["train"], "test": f0["test"], "genes": genes,
                                "embedding": load_config(w.config, with_gene_set(w.overrides)).embedding}
        where = f"{Path(cohort).name}, fold 0 of {folds} (seed {w.seed}), genes {genes}"
    else:
        syn = synthetic or SyntheticSlides()
        data = syn.data(w.seed)
        where = (f"synthetic: {syn.n_train} training + {syn.n_test} test slides of ~{syn.n_spots} spots, "
                 f"{syn.n_genes} genes")
    specs = w.specs(data)
    out = Path(out_dir)
    key = timing_key(specs, timeout=w.timeout)
    if (prior := reusable(out / "efficiency.json", key, reuse)) is not None:
        return prior
    records = [w.run(s) for s in tqdm(specs, desc="efficiency", unit="method", disable=not w.progress)]
    settings = w.record(records)
    table = format_efficiency_table(records)
    header = (f"Efficiency (Table 1) on {settings['device']}. Data: {where}. {w.epochs} training epoch(s) per method "
              "with epochs; train time per slide per epoch, inference time per slide (after one warm-up slide); memory "
              + ("CUDA peak allocated/reserved" if specs[0]["device"].startswith("cuda") else "resident set "
                 "size (RSS) of a separate process per method; ΔRSS = peak minus RSS before the fit/predict")
              + "; GB/1k = per 1,000 spots of the largest training slide.")
    result = {"records": records, "table": table, "where": where, "out_dir": str(out), "header": header, **settings,
              "command": command, "key": key}
    write_json(result, out / "efficiency.json")
    (out / "table.md").write_text(header + "\n\n" + table + "\n")
    return result
