"""`hist-st bench encoder`: patch encoder throughput (patches/s) per setting, and the prepare pipeline's
(`hist_st.embed.embed_batches` reading on the encoder's thread, ``prefetch 0``, or in the background,
``prefetch 2``). Settings are timed interleaved, one batch of each in turn, so that a machine whose speed
drifts slows all of them alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hist_st.bench.harness import matmul_gflops, sync
from hist_st.bench.host import HER2ST, her2st_slide
from hist_st.embed import embed_batches
from hist_st.encoders import get_encoder
from hist_st.wsi import PatchParams, iter_patch_batches, open_image

__all__ = ["encoder_bench", "format_encoder"]


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
    settings = [(p, b) for p in precisions for b in batch_sizes]
    rates: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    cos: dict[tuple[str, int], np.ndarray] = {}
    for r in range(rounds + 1):
        for p, b in settings:
            sync(device)
            t = time.perf_counter()
            e = encs[p].encode(patches[:b])
            rate = b / (time.perf_counter() - t)
            if r == 0:  # the warm-up round: cosine of each embedding to the reference's
                norms = np.linalg.norm(e, axis=1) * np.linalg.norm(ref[:b], axis=1)
                cos[(p, b)] = (e * ref[:b]).sum(1) / norms
            else:
                rates[(p, b)].append(rate)
    rows = [
        {"precision": p, "batch": b, "patches_per_s": statistics.median(rates[(p, b)]),
         "all": rates[(p, b)], "cos_min": float(cos[(p, b)].min()), "cos_median": float(np.median(cos[(p, b)]))}
        for p, b in settings
    ]
    label = "random pixels" if slide is None else f"her2st {slide.slide_id} patches"
    out: dict[str, Any] = {"encoder": base.name, "device": device, "threads": threads, "patches": label,
                           "rows": rows, "pipeline": []}
    if pipeline and image is not None:
        n = min(slide.n_spots, 4 * big)
        b = batch_sizes[0]
        prate: dict[int, list[float]] = {0: [], 2: []}
        for r in range(max(2, rounds // 2) + 1):
            for depth in (0, 2):
                batches = iter_patch_batches(image, slide.spatial[:n], slide.um_per_px, PatchParams(), b)
                t = time.perf_counter()
                embed_batches(encs[precisions[0]], batches, n=n, prefetch_depth=depth)
                if r:
                    prate[depth].append(n / (time.perf_counter() - t))
        out["pipeline"] = [{"prefetch": d, "precision": precisions[0], "batch": b, "patches": n,
                            "patches_per_s": statistics.median(v), "all": v} for d, v in prate.items()]
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
