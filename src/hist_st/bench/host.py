"""`hist-st bench host`: what one training step costs on the host when the model is tiny (issue 15, item 2).

On a her2st-sized slide (~200 spots) with a dim-32 model, kernel time is negligible, so a step's time
is augmentation, lattice mapping, batch building and the Python/dispatcher cost of the forward, backward
and optimiser step: a lower bound for any GPU step on small slides. Each phase is timed separately,
step after step, and the median over many steps is reported, with the number of tensor operations the
forward and backward dispatch (from which the cost per operation follows).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from hist_st.bench.harness import matmul_gflops
from hist_st.data.synthetic import make_slide
from hist_st.io.legacy_st import find_her2st_sections, read_her2st_section
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.model import HiST, HiSTConfig
from hist_st.train.augment import augment_coords, schedule_strength
from hist_st.train.config import AugmentConfig, TrainConfig
from hist_st.train.loop import build_optimizer, forward_loss

__all__ = ["host_overhead", "format_host"]

#: The real her2st folder: ``$HIST_ST_HER2ST``, else ``../shared/data/her2st`` from where the command runs.
HER2ST = Path(os.environ.get("HIST_ST_HER2ST", "../shared/data/her2st"))
PHASES = ("augment", "lattice", "batch", "forward", "backward", "optimizer")


def _her2st_or_synthetic(section: str, root: Path, spots: int, seed: int) -> tuple[np.ndarray, str]:
    """Continuous lattice coordinates ``[N, 2]`` of her2st ``section`` when present, else a synthetic slide."""

    if (root / "ST-spotfiles").is_dir():
        for sec in find_her2st_sections(root):
            if sec.slide_id == section:
                slide = read_her2st_section(sec)
                return continuous_coords(slide), f"her2st {section} ({slide.n_spots} spots)"

    slide = make_slide("host", n_spots=spots, grid="square", seed=seed, n_genes=8, embed_dim=4)
    return continuous_coords(slide), f"synthetic square lattice ({slide.n_spots} spots)"


def _count_ops(fn) -> int:
    """Number of aten operations ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def host_overhead(
    *, section: str = "C3", root: str | Path = HER2ST, spots: int = 200, dim: int = 32, heads: int = 4,
    in_dim: int = 1024, genes: int = 250, steps: int = 60, warmup: int = 5, threads: int = 1, seed: int = 0,
) -> dict[str, Any]:
    """Median seconds per phase of a training step on one small slide.

    Args:
        section: her2st section used when ``root`` holds the her2st data (else a synthetic slide).
        root: The her2st folder.
        spots: Spots of the synthetic fallback slide.
        dim, heads: The tiny model's width and heads (default model otherwise).
        in_dim, genes: Embedding width and genes (random embeddings and targets).
        steps: Timed steps (after ``warmup``).
        threads: torch threads.
        seed: Seed of the augmentation draws and the data.

    Returns:
        ``{"slide", "phases": {phase: median s}, "step_s", "unaccounted_s", "ops_forward", "ops_backward",
        "us_per_op", ...}``.
    """
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    xy, label = _her2st_or_synthetic(section, Path(root), spots, seed)
    n = len(xy)
    feats = torch.randn(n, in_dim)
    target = torch.randn(n, genes)
    model = HiST(HiSTConfig(in_dim=in_dim, n_genes=genes, dim=dim, heads=heads)).train()
    opt, sched = build_optimizer(model, TrainConfig(), steps + warmup + 1)
    aug = AugmentConfig()
    strength = schedule_strength(0, 100, aug)
    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {p: [] for p in (*PHASES, "step")}
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, i, 0, 0xA06])
        xa, keep = augment_coords(xy, rng, aug, strength)
        t1 = time.perf_counter()
        lat = to_lattice(xa)
        t2 = time.perf_counter()
        keep_t = torch.from_numpy(keep)
        batch = model.make_batch(torch.from_numpy(lat), feats.index_select(0, keep_t))
        item = {"batch": batch, "target": target.index_select(0, keep_t)}
        t3 = time.perf_counter()
        loss = forward_loss(model, item, cpu, False)
        t4 = time.perf_counter()
        loss.backward()
        t5 = time.perf_counter()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t6 = time.perf_counter()
        if i >= warmup:
            for p, dt in zip((*PHASES, "step"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0)):
                times[p].append(dt)
    med = {p: statistics.median(v) for p, v in times.items()}
    loss_holder: dict[str, Any] = {}

    def fwd() -> None:
        loss_holder["loss"] = forward_loss(model, item, cpu, False)

    ops_fwd = _count_ops(fwd)
    ops_bwd = _count_ops(lambda: loss_holder["loss"].backward())
    opt.zero_grad(set_to_none=True)
    model_s = med["forward"] + med["backward"]

    return {
        "matmul_gflops": matmul_gflops("cpu"),
        "slide": label,
        "spots": n,
        "threads": threads,
        "model": {"dim": dim, "heads": heads, "in_dim": in_dim, "genes": genes},
        "steps": steps,
        "phases": {p: med[p] for p in PHASES},
        "step_s": med["step"],
        "host_data_s": med["augment"] + med["lattice"] + med["batch"],
        "ops_forward": ops_fwd,
        "ops_backward": ops_bwd,
        "us_per_op": 1e6 * model_s / max(ops_fwd + ops_bwd, 1),
    }


def format_host(r: dict[str, Any]) -> str:
    """Human-readable lines of a `host_overhead` result."""
    lines = [f"{r['slide']}, dim-{r['model']['dim']} model, {r['threads']} thread(s), median of {r['steps']} steps "
             f"(same-run dense matmul {r['matmul_gflops']:.0f} GFLOP/s):"]
    for p, s in r["phases"].items():
        lines.append(f"  {p:<10} {1e3 * s:8.2f} ms")
    lines.append(f"  {'step':<10} {1e3 * r['step_s']:8.2f} ms (data on the host {1e3 * r['host_data_s']:.2f} ms)")
    lines.append(f"  forward + backward dispatch {r['ops_forward']} + {r['ops_backward']} tensor ops, "
                 f"{r['us_per_op']:.1f} us per op")
    return "\n".join(lines)
