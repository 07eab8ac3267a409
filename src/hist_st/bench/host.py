"""`hist-st bench host`: what one training step costs on the host when the model is tiny (issue 15, item 2).
With a dim-32 model on ~200 spots kernel time is negligible, so the median time per phase and the tensor
operations the forward and backward dispatch bound any GPU step on small slides from below.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hist_st.bench.harness import matmul_gflops
from hist_st.data.synthetic import make_slide
from hist_st.io.legacy_st import find_her2st_sections, read_her2st_section
from hist_st.lattice import continuous_coords, to_lattice
from hist_st.model import HiST, HiSTConfig
from hist_st.slide import Slide
from hist_st.train.augment import augment_coords, schedule_strength
from hist_st.train.config import AugmentConfig, TrainConfig
from hist_st.train.loop import build_optimizer, finish_step, forward_loss

__all__ = ["HER2ST", "her2st_slide", "host_overhead", "format_host"]

#: The real her2st folder: ``$HIST_ST_HER2ST``, else ``../shared/data/her2st`` from where the command runs.
HER2ST = Path(os.environ.get("HIST_ST_HER2ST", "../shared/data/her2st"))
PHASES = ("augment", "lattice", "batch", "forward", "backward", "optimizer")


def her2st_slide(root: str | Path, section: str | None = None) -> Slide | None:
    """her2st ``section`` of ``root`` (None: the first section with an image), or None without such data."""
    if not (Path(root) / "ST-spotfiles").is_dir():
        return None
    want = (lambda s: s.slide_id == section) if section else (lambda s: s.image is not None)
    sec = next(filter(want, find_her2st_sections(root)), None)
    return None if sec is None else read_her2st_section(sec)


class _CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside it (``n``)."""

    n = 0

    def __torch_dispatch__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        self.n += 1
        return func(*args, **(kwargs or {}))


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
        ``{"slide", "phases": {phase: median s}, "step_s", "host_data_s", "ops_forward", "ops_backward",
        "us_per_op", ...}``.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    slide = her2st_slide(root, section)
    label = "synthetic square lattice" if slide is None else f"her2st {section}"
    slide = slide or make_slide("host", n_spots=spots, grid="square", seed=seed, n_genes=8, embed_dim=4)
    xy = continuous_coords(slide)
    feats, target = torch.randn(len(xy), in_dim), torch.randn(len(xy), genes)
    model = HiST(HiSTConfig(in_dim=in_dim, n_genes=genes, dim=dim, heads=heads)).train()
    opt, sched = build_optimizer(model, TrainConfig(), steps + warmup + 1)
    aug = AugmentConfig()
    strength = schedule_strength(0, 100, aug)
    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {p: [] for p in (*PHASES, "step")}
    for i in range(steps + warmup):
        t = [time.perf_counter()]
        xa, keep = augment_coords(xy, np.random.default_rng([seed, i, 0, 0xA06]), aug, strength)
        t.append(time.perf_counter())
        lat = to_lattice(xa)
        t.append(time.perf_counter())
        keep_t = torch.from_numpy(keep)
        batch = model.make_batch(torch.from_numpy(lat), feats.index_select(0, keep_t))
        item = {"batch": batch, "target": target.index_select(0, keep_t)}
        t.append(time.perf_counter())
        loss = forward_loss(model, item, cpu, False)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        finish_step(model, opt, sched)
        t.append(time.perf_counter())
        if i >= warmup:
            for p, dt in zip((*PHASES, "step"), (*np.diff(t), t[-1] - t[0])):
                times[p].append(float(dt))
    med = {p: statistics.median(v) for p, v in times.items()}
    with _CountOps() as fwd:
        loss = forward_loss(model, item, cpu, False)
    with _CountOps() as bwd:
        loss.backward()
    return {
        "matmul_gflops": matmul_gflops("cpu"), "slide": f"{label} ({slide.n_spots} spots)", "spots": len(xy),
        "threads": threads, "model": {"dim": dim, "heads": heads, "in_dim": in_dim, "genes": genes},
        "steps": steps, "phases": {p: med[p] for p in PHASES}, "step_s": med["step"],
        "host_data_s": med["augment"] + med["lattice"] + med["batch"],
        "ops_forward": fwd.n, "ops_backward": bwd.n,
        "us_per_op": 1e6 * (med["forward"] + med["backward"]) / max(fwd.n + bwd.n, 1),
    }


def format_host(r: dict[str, Any]) -> str:
    """Human-readable lines of a `host_overhead` result."""
    lines = [f"{r['slide']}, dim-{r['model']['dim']} model, {r['threads']} thread(s), median of {r['steps']} steps "
             f"(same-run dense matmul {r['matmul_gflops']:.0f} GFLOP/s):"]
    lines += [f"  {p:<10} {1e3 * s:8.2f} ms" for p, s in r["phases"].items()]
    lines.append(f"  {'step':<10} {1e3 * r['step_s']:8.2f} ms (data on the host {1e3 * r['host_data_s']:.2f} ms)")
    lines.append(f"  forward + backward dispatch {r['ops_forward']} + {r['ops_backward']} tensor ops, "
                 f"{r['us_per_op']:.1f} us per op")
    return "\n".join(lines)
