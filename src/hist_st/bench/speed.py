"""`hist-st bench speed`: train-step and inference time, peak memory and FLOP/s of HiST (paper Fig. 3).

Each measurement runs in a fresh subprocess so that its peak memory (CPU RSS from ``getrusage``, or
CUDA allocated/reserved) belongs to that setting alone. Every subprocess also times a dense fp32
matmul, so the model's achieved FLOP/s can be read against what the machine delivers at that moment.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hist_st.data.synthetic import make_slide
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.memory import MallocPolicy, apply_malloc, parse_malloc, trim_heap
from hist_st.model import HiST, HiSTConfig
from hist_st.train.config import config_from_dict
from hist_st.train.loop import build_optimizer, finish_step, forward_loss, step_in_backward

__all__ = ["SpeedSettings", "measure", "run_speed_bench", "plot_speed"]

DEFAULT_SPOTS = (500, 2000, 5000, 20000, 100000)
DEFAULT_GENES = (250, 1000, 2000, 4000)


@dataclass
class SpeedSettings:
    """One measurement: a slide of ``spots`` tokens, ``genes`` outputs, in ``mode`` train or infer."""

    spots: int
    genes: int
    mode: str  # "train" | "infer"
    in_dim: int = 1024
    threads: int = 2
    repeats: int = 3
    device: str = "cpu"
    grid: str = "square"
    seed: int = 0
    grad_checkpointing: str = "none"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA only), "fp32" or "bf16" (also on the CPU)
    malloc: str = "default"  # a HIST_ST_MALLOC policy (hist_st.memory): "default" (as hist-st train), "fixed:4M", ...
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys of train steps, e.g. optimizer_in_backward


def _matmul_gflops(device: str, size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Dense ``size x size`` matmul GFLOP/s of this process now (median of ``repeats`` after a warm-up)."""
    import torch

    a = torch.randn(size, size, device=device).to(getattr(torch, dtype))
    b = torch.randn(size, size, device=device).to(getattr(torch, dtype))
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times[1:]) / 1e9


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _slide(spots: int, grid: str, seed: int):

    slide = make_slide("bench", n_spots=spots, grid=grid, seed=seed, n_genes=8, embed_dim=4)
    lattice = to_lattice(continuous_coords(slide))
    return lattice, len(lattice)


def autocast_enabled(precision: str, device: str) -> bool:
    """Whether a setting runs the trunk under bf16 autocast: ``auto`` = on CUDA only, ``bf16``, ``fp32``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: choose auto, fp32 or bf16")
    return precision == "bf16" or (precision == "auto" and device.startswith("cuda"))


def measure(s: SpeedSettings) -> dict[str, Any]:
    """Run one setting in this process and return its timings, memory and FLOPs.

    The timed steps are what a user runs: inference is `HiST.forward` under ``inference_mode``; a train
    step is `hist_st.train.loop.forward_loss` (chunked head and loss), backward and
    `hist_st.train.loop.finish_step` with the fused AdamW of `hist_st.train.loop.build_optimizer` (updated
    during backward with ``train={"optimizer_in_backward": True}``), with the same allocator setting as ``hist-st train``
    (`hist_st.memory`). The peak RSS is read right after them; the matmul reference and the FLOP count
    (a separate forward pass) come after that reading, so neither adds to the memory reported.
    """
    import torch

    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # the library alone

    allocator = apply_malloc(parse_malloc(s.malloc, "--malloc")) if s.device == "cpu" else MallocPolicy()
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    dev = s.device
    amp = autocast_enabled(s.precision, dev)
    lattice, n = _slide(s.spots, s.grid, s.seed)
    feats = torch.randn(n, s.in_dim, device=dev)
    model = HiST(HiSTConfig(in_dim=s.in_dim, n_genes=s.genes, **s.model)).to(dev)
    train_cfg = config_from_dict({"grad_checkpointing": s.grad_checkpointing, **s.train})
    model.set_grad_checkpointing(train_cfg.grad_checkpointing)
    autocast = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=amp)

    t = time.perf_counter()
    batch = model.make_batch(lattice, feats)
    build_s = time.perf_counter() - t
    tokens_per_level = [lv.num_tokens for lv in batch.levels]
    del batch

    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, build_times = [], []
    if s.mode == "train":
        target = torch.randn(n, s.genes, device=dev)
        model.train()
        opt, sched = build_optimizer(model, train_cfg, 1000)
        hooks = step_in_backward(opt, train_cfg)  # as hist-st train: None unless optimizer_in_backward
        for _ in range(s.repeats + 1):
            _sync(dev)
            t0 = time.perf_counter()
            batch = model.make_batch(lattice, feats)  # indices are rebuilt per step (augmented lattice)
            t1 = time.perf_counter()
            loss = forward_loss(model, {"batch": batch, "target": target}, torch.device(dev), amp)
            loss.backward()
            finish_step(model, opt, sched, in_backward=hooks is not None)
            if allocator.trim:  # as hist-st train with HIST_ST_MALLOC=...,trim
                trim_heap()
            _sync(dev)
            times.append(time.perf_counter() - t0)
            build_times.append(t1 - t0)
            del batch, loss
    else:
        model.eval()
        with torch.inference_mode():
            for _ in range(s.repeats + 1):
                _sync(dev)
                t0 = time.perf_counter()
                batch = model.make_batch(lattice, feats)
                t1 = time.perf_counter()
                with autocast:
                    y = model(batch)
                _sync(dev)
                times.append(time.perf_counter() - t0)
                build_times.append(t1 - t0)
                del batch, y
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    cuda_mem = {}
    if dev.startswith("cuda"):
        cuda_mem = {"cuda_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                    "cuda_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
                    "gpu": torch.cuda.get_device_name()}  # fmt: skip
    # After the memory reading: the matmul references and the FLOP count.
    gflops_matmul = _matmul_gflops(dev)
    gflops_bf16 = _matmul_gflops(dev, dtype="bfloat16")
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(model.make_batch(lattice, feats))
    fwd_flops = counter.get_total_flops()
    flops = 3 * fwd_flops if s.mode == "train" else fwd_flops  # backward = 2x forward
    sec = statistics.median(times[1:])
    out: dict[str, Any] = {
        **{k: v for k, v in asdict(s).items() if k not in ("model", "train")},
        "model": s.model,
        "train": s.train,
        "autocast_bf16": amp,
        "seconds": sec,
        "seconds_all": times[1:],
        "index_build_seconds": statistics.median(build_times[1:]),
        "first_build_seconds": build_s,
        "tokens_per_level": tokens_per_level,
        "gflop": flops / 1e9,
        "achieved_gflops": flops / sec / 1e9,
        "matmul_gflops": gflops_matmul,
        "matmul_bf16_gflops": gflops_bf16,
        "fraction_of_matmul": flops / sec / 1e9 / gflops_matmul,
        "peak_rss_gb": peak_rss,
        "import_rss_gb": import_rss,
        **cuda_mem,
    }
    return out


def _run_worker(s: SpeedSettings, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads))
    cmd = [sys.executable, "-m", "hist_st.bench.speed", json.dumps(asdict(s))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**asdict(s), "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**asdict(s), "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_speed_bench(
    out_dir: str | Path,
    spots: tuple[int, ...] = DEFAULT_SPOTS,
    genes: tuple[int, ...] = DEFAULT_GENES,
    grid_mode: str = "sweep",
    modes: tuple[str, ...] = ("infer", "train"),
    max_train_spots: int = 20000,
    base_spots: int = 5000,
    base_genes: int = 2000,
    json_lines: bool = False,
    timeout: float = 900.0,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Measure every setting and write ``speed.json`` and the Figure-3 plots into ``out_dir``.

    Args:
        out_dir: Output folder.
        spots: Slide sizes N.
        genes: Gene counts G.
        grid_mode: ``sweep`` (N at ``base_genes``, and G at ``base_spots``; a base that is not among the
            swept values is replaced by the largest one) or ``full`` (every pair).
        modes: ``infer`` and/or ``train``.
        max_train_spots: Largest N for train steps.
        json_lines: Print one JSON line per setting instead of a table row.
        timeout: Seconds allowed per setting.
        **settings: Passed to `SpeedSettings` (threads, device, repeats, in_dim, grid, model, ...).

    Returns:
        One result dict per setting.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if grid_mode == "full":
        pairs = [(n, g) for n in spots for g in genes]
    else:  # spots at the base gene count, then genes at the base spot count (bases must be swept values)
        base_genes = base_genes if base_genes in genes else max(genes)
        base_spots = base_spots if base_spots in spots else max(spots)
        pairs = [(n, base_genes) for n in spots] + [(base_spots, g) for g in genes if g != base_genes]
    jobs = [
        SpeedSettings(spots=n, genes=g, mode=m, **settings)
        for n, g in pairs
        for m in modes
        if not (m == "train" and n > max_train_spots)
    ]
    results = []
    bar = tqdm(jobs, desc="bench speed", disable=json_lines, file=sys.stderr)
    for job in bar:
        bar.set_postfix(N=job.spots, G=job.genes, mode=job.mode)
        r = _run_worker(job, timeout)
        results.append(r)
        if json_lines:
            print(json.dumps(r), flush=True)
        else:
            tqdm.write(format_row(r), file=sys.stdout)
    payload = {"results": results, "environment": environment()}
    (out_dir / "speed.json").write_text(json.dumps(payload, indent=2))
    plot_speed(results, out_dir)
    return results


def format_row(r: dict[str, Any]) -> str:
    head = f"N={r['spots']:>6} G={r['genes']:>4} {r['mode']:>5}"
    if "error" in r:
        return f"{head}  ERROR {r['error']}"
    mem = f"RSS {r['peak_rss_gb']:.2f} GB ({r['peak_rss_gb'] - r.get('import_rss_gb', 0):.2f} over import torch)"
    if "cuda_reserved_gb" in r:
        mem += f", CUDA alloc {r['cuda_allocated_gb']:.2f} / reserved {r['cuda_reserved_gb']:.2f} GB"
    return (
        f"{head}  {r['seconds']:.3f} s (index build {r['index_build_seconds']:.3f} s)  {mem}  "
        f"{r['gflop']:.1f} GFLOP -> {r['achieved_gflops']:.0f} GFLOP/s = "
        f"{100 * r['fraction_of_matmul']:.0f}% of dense fp32 matmul ({r['matmul_gflops']:.0f} GFLOP/s; "
        f"bf16 {r.get('matmul_bf16_gflops', float('nan')):.0f})" + ("  [bf16 autocast]" if r.get("autocast_bf16") else "")
    )


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def plot_speed(results: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Log-log time and memory against spots and against genes (paper Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    paths = []
    for axis, fixed in (("spots", "genes"), ("genes", "spots")):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        for mode in ("infer", "train"):
            rows = [r for r in ok if r["mode"] == mode]
            if not rows:
                continue
            # the most common value of the other axis is the sweep's fixed value
            vals = [r[fixed] for r in rows]
            keep = max(set(vals), key=vals.count)
            rows = sorted((r for r in rows if r[fixed] == keep), key=lambda r: r[axis])
            if len(rows) < 2:
                continue
            x = [r[axis] for r in rows]
            ax_t.plot(x, [r["seconds"] for r in rows], "o-", label=f"{mode} ({fixed}={keep})")
            mem = [r.get("cuda_reserved_gb", r["peak_rss_gb"]) for r in rows]
            ax_m.plot(x, mem, "o-", label=f"{mode} ({fixed}={keep})")
        for ax, ylabel in ((ax_t, "seconds per slide"), (ax_m, "peak memory (GB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"HiST time and memory vs {axis}")
        fig.tight_layout()
        path = Path(out_dir) / f"speed_vs_{axis}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":  # worker entry point: one setting, JSON on the last stdout line
    print(json.dumps(measure(SpeedSettings(**json.loads(sys.argv[1])))))
