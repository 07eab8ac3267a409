"""`hist-st bench speed`: HiST's train-step and inference time, peak memory and FLOP/s against spots and
genes, one step as a user runs it on synthetic lattice slides, one fresh process per setting (issue 15;
every method's Figure 3 is `hist_st.bench.scaling`)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hist_st.bench.harness import GB, PeakMemory, matmul_gflops, run_isolated, timed_steps
from hist_st.bench.plots import plot_speed
from hist_st.data.synthetic import make_slide
from hist_st.jsonio import write_json
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.memory import THP_ENV, MallocPolicy, apply_malloc, parse_malloc, trim_heap
from hist_st.model import HiST, HiSTConfig
from hist_st.train.config import config_from_dict
from hist_st.train.loop import build_optimizer, finish_step, forward_loss, step_in_backward

__all__ = ["SpeedSettings", "measure", "worker", "run_speed_bench", "plot_speed", "format_row"]

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


def measure(s: SpeedSettings) -> dict[str, Any]:
    """Run one setting in this process and return its timings, memory and FLOPs.

    Inference is `HiST.forward`; a train step `hist_st.train.loop.forward_loss`, backward and `finish_step`
    as in ``hist-st train``, lattice indices rebuilt every step. The peak memory is read right after them
    (``import_rss_gb``: the library alone), before the matmul reference and the FLOP count.
    """
    dev = s.device
    if s.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {s.precision!r}: choose auto, fp32 or bf16")
    amp = s.precision == "bf16" or (s.precision == "auto" and dev.startswith("cuda"))  # bf16 autocast
    with PeakMemory(dev) as mem:
        allocator = apply_malloc(parse_malloc(s.malloc, "--malloc")) if dev == "cpu" else MallocPolicy()
        torch.set_num_threads(s.threads)
        torch.manual_seed(s.seed)
        slide = make_slide("bench", n_spots=s.spots, grid=s.grid, seed=s.seed, n_genes=8, embed_dim=4)
        lattice = to_lattice(continuous_coords(slide))
        feats = torch.randn(len(lattice), s.in_dim, device=dev)
        model = HiST(HiSTConfig(in_dim=s.in_dim, n_genes=s.genes, **s.model)).to(dev)
        train_cfg = config_from_dict({"grad_checkpointing": s.grad_checkpointing, **s.train})
        model.set_grad_checkpointing(train_cfg.grad_checkpointing)
        build_times: list[float] = []  # the first build, the warm-up step's, then the timed steps'

        def batch() -> Any:
            t0 = time.perf_counter()
            b = model.make_batch(lattice, feats)
            build_times.append(time.perf_counter() - t0)
            return b

        tokens_per_level = [lv.num_tokens for lv in batch().levels]
        if s.mode == "train":
            target = torch.randn(len(lattice), s.genes, device=dev)
            opt, sched = build_optimizer(model.train(), train_cfg, 1000)
            hooks = step_in_backward(opt, train_cfg)  # as hist-st train: None unless optimizer_in_backward

            def step() -> None:
                forward_loss(model, {"batch": batch(), "target": target}, torch.device(dev), amp).backward()
                finish_step(model, opt, sched, in_backward=hooks is not None)
                if allocator.trim:  # as hist-st train with HIST_ST_MALLOC=...,trim
                    trim_heap()
        else:
            model.eval()

            def step() -> None:
                with torch.inference_mode(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                    model(batch())

        times = timed_steps(step, dev, s.repeats)
    # imported after the memory reading: it adds ~80 MB of RSS
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(model.make_batch(lattice, feats))
    flops = counter.get_total_flops() * (3 if s.mode == "train" else 1)  # backward = 2x forward
    sec, fp32 = statistics.median(times), matmul_gflops(dev)
    cuda = {"cuda_allocated_gb": mem.cuda_allocated / GB, "cuda_reserved_gb": mem.cuda_reserved / GB,
            "gpu": torch.cuda.get_device_name()} if mem.cuda else {}
    return {
        **asdict(s), "autocast_bf16": amp, "seconds": sec, "seconds_all": times,
        "index_build_seconds": statistics.median(build_times[2:]), "first_build_seconds": build_times[0],
        "tokens_per_level": tokens_per_level, "gflop": flops / 1e9, "achieved_gflops": flops / sec / 1e9,
        "matmul_gflops": fp32, "matmul_bf16_gflops": matmul_gflops(dev, dtype="bfloat16"),
        "fraction_of_matmul": flops / sec / 1e9 / fp32, "peak_rss_gb": mem.rss_peak / GB,
        "import_rss_gb": mem.rss_before / GB, "huge_pages": os.environ.get(THP_ENV, "0") == "1", **cuda,
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """`measure` of a `SpeedSettings` given as a dict (the `hist_st.bench.harness.run_isolated` entry)."""
    return measure(SpeedSettings(**spec))


def run_speed_bench(
    out_dir: str | Path, spots: tuple[int, ...] = DEFAULT_SPOTS, genes: tuple[int, ...] = DEFAULT_GENES,
    grid_mode: str = "sweep", modes: tuple[str, ...] = ("infer", "train"), max_train_spots: int = 20000,
    base_spots: int = 5000, base_genes: int = 2000, json_lines: bool = False, timeout: float = 900.0,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Measure every setting, each in a fresh process, and write ``speed.json`` and the plots into ``out_dir``.

    Args:
        out_dir: Output folder.
        spots, genes: Slide sizes N and gene counts G.
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
    if grid_mode == "full":
        pairs = [(n, g) for n in spots for g in genes]
    else:  # spots at the base gene count, then genes at the base spot count (bases must be swept values)
        base_genes = base_genes if base_genes in genes else max(genes)
        base_spots = base_spots if base_spots in spots else max(spots)
        pairs = [(n, base_genes) for n in spots] + [(base_spots, g) for g in genes if g != base_genes]
    jobs = [SpeedSettings(spots=n, genes=g, mode=m, **settings) for n, g in pairs for m in modes
            if not (m == "train" and n > max_train_spots)]
    results = []
    bar = tqdm(jobs, desc="bench speed", disable=json_lines, file=sys.stderr)
    for job in bar:
        bar.set_postfix(N=job.spots, G=job.genes, mode=job.mode)
        results.append(run_isolated("hist_st.bench.speed", asdict(job), timeout=timeout, threads=job.threads))
        if json_lines:
            print(json.dumps(results[-1]), flush=True)
        else:
            tqdm.write(format_row(results[-1]), file=sys.stdout)
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor(), "cpu_count": os.cpu_count(),
           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    write_json({"results": results, "environment": env}, Path(out_dir) / "speed.json")
    plot_speed(results, out_dir)
    return results


def format_row(r: dict[str, Any]) -> str:
    """One line of a `measure` record (or its error)."""
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
