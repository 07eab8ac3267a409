"""`hist-st bench encoder`: patch encoder throughput (patches/s) per setting, and the prepare pipeline's
(`hist_st.embed.embed_batches` reading on the encoder's thread, ``prefetch 0``, or in the background,
``prefetch 2``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hist_st.bench.harness import matmul_gflops, timed_steps
from hist_st.bench.host import HER2ST, her2st_slide
from hist_st.embed import embed_batches
from hist_st.encoders import get_encoder
from hist_st.wsi import PatchParams, iter_patch_batches, open_image

__all__ = ["encoder_bench", "format_encoder"]


def _interleaved(calls: dict[Hashable, Callable[[], Any]], rounds: int, device: str) -> tuple[dict, dict]:
    """Each call's result in an untimed warm-up round, and its seconds in each of ``rounds`` timed rounds. One
    call of each in turn, round after round, so that a machine whose speed drifts slows all of them alike."""
    first = {k: call() for k, call in calls.items()}
    seconds: dict[Hashable, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            seconds[k] += timed_steps(call, device, repeats=1, warmup=0)
    return first, seconds


def encoder_bench(
    *, encoder: str = "efficientnet-lite0", weights: str | None = None, device: str = "cpu", threads: int = 2,
    batch_sizes: tuple[int, ...] = (32, 64), precisions: tuple[str, ...] = ("fp32", "bf16"), rounds: int = 4,
    pipeline: bool = True, root: str | Path = HER2ST,
) -> dict[str, Any]:
    """Patches/s of the encoder per (precision, batch size), and of the whole patch-to-embedding loop.

    Args:
        encoder, weights: The encoder (`hist_st.encoders.get_encoder`).
        device: ``cpu`` or ``cuda`` (bf16 there means autocast, as ``prepare`` always uses on CUDA).
        threads: torch threads.
        batch_sizes: Patches per batch.
        precisions: ``fp32`` (prepare's default) and/or ``bf16`` (``--encoder-precision bf16``).
        rounds: Timed rounds after one warm-up round.
        pipeline: Also time `embed_batches` on patches cut from a real slide (needs the her2st data).
        root: The her2st folder.

    Returns:
        ``{"rows": [{"precision", "batch", "patches_per_s", "cos_min", "cos_median"}], "pipeline": [...],
        "patches": "her2st ..." | "random", ...}``.
    """
    if device != "cpu" and "bf16" not in precisions:
        raise ValueError("on CUDA the encoder always runs under bf16 autocast: use precisions=('bf16',)")
    torch.set_num_threads(threads)
    base = get_encoder(encoder, weights, device)
    big = max(batch_sizes)
    slide = her2st_slide(root)  # real patches from the first her2st section with an image, else random pixels
    image = None if slide is None else open_image(slide.image, slide.um_per_px)
    if image is None:
        patches = np.random.default_rng(0).integers(0, 256, size=(big, 224, 224, 3), dtype=np.uint8)
    else:
        patches, _ = next(iter_patch_batches(image, slide.spatial[:big], slide.um_per_px, PatchParams(), big))
    encs = {p: base.with_precision(p) if device == "cpu" else base for p in precisions}
    ref = base.encode(patches)  # fp32 on the CPU (bf16 autocast on CUDA)
    calls = {(p, b): partial(encs[p].encode, patches[:b]) for p in precisions for b in batch_sizes}
    first, seconds = _interleaved(calls, rounds, device)
    rows = []
    for (p, b), e in first.items():  # e: the warm-up round's embeddings, against the reference's
        cos = (e * ref[:b]).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref[:b], axis=1))
        rates = [b / s for s in seconds[(p, b)]]
        rows.append({"precision": p, "batch": b, "patches_per_s": statistics.median(rates), "all": rates,
                     "cos_min": float(cos.min()), "cos_median": float(np.median(cos))})
    label = "random pixels" if slide is None else f"her2st {slide.slide_id} patches"
    out: dict[str, Any] = {"encoder": base.name, "device": device, "threads": threads, "patches": label,
                           "rows": rows, "pipeline": []}
    if pipeline and image is not None:
        n, b = min(slide.n_spots, 4 * big), batch_sizes[0]

        def embed(depth: int) -> Any:
            batches = iter_patch_batches(image, slide.spatial[:n], slide.um_per_px, PatchParams(), b)
            return embed_batches(encs[precisions[0]], batches, n=n, prefetch_depth=depth)

        _, seconds = _interleaved({d: partial(embed, d) for d in (0, 2)}, max(2, rounds // 2), device)
        piped = {d: [n / s for s in t] for d, t in seconds.items()}
        out["pipeline"] = [{"prefetch": d, "precision": precisions[0], "batch": b, "patches": n,
                            "patches_per_s": statistics.median(v), "all": v} for d, v in piped.items()]
    if image is not None:
        image.close()
    out["matmul_gflops"] = matmul_gflops(device)  # the machine's speed now, to read the rates against
    out["matmul_bf16_gflops"] = matmul_gflops(device, dtype="bfloat16")
    return out


def format_encoder(r: dict[str, Any]) -> str:
    """Human-readable lines of an `encoder_bench` result."""
    lines = [f"{r['encoder']} on {r['device']} ({r['threads']} threads), {r['patches']}; same-run dense matmul "
             f"{r['matmul_gflops']:.0f} GFLOP/s fp32, {r['matmul_bf16_gflops']:.0f} bf16:"]
    lines += [f"  {row['precision']:<5} batch {row['batch']:>3}: {row['patches_per_s']:7.1f} patches/s  "
              f"cosine to fp32 min {row['cos_min']:.4f} median {row['cos_median']:.4f}" for row in r["rows"]]
    lines += [f"  pipeline (cut + encode {row['patches']} patches, prefetch {row['prefetch']}): "
              f"{row['patches_per_s']:.1f} patches/s" for row in r["pipeline"]]
    return "\n".join(lines)
