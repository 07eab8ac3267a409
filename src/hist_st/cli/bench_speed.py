"""``hist-st bench speed|host|encoder``: HiST's step time, memory and FLOP/s against spots and genes, the host
cost of a small-slide training step, and patch-encoder throughput (issue 15)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hist_st.errors import InputError
from hist_st.memory import parse_malloc
from hist_st.model.hist import GRAD_CHECKPOINTING
from hist_st.train.config import RENAMED, config_from_dict, parse_overrides


def ints(value: str) -> tuple[int, ...]:
    """``"500,2000"`` -> ``(500, 2000)`` (an argparse ``type``)."""
    return tuple(int(v) for v in value.split(",") if v.strip())


def cmd_speed(args: argparse.Namespace) -> int:
    from hist_st.bench.speed import DEFAULT_GENES, DEFAULT_SPOTS, run_speed_bench

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or set(modes) - {"infer", "train"}:
        raise InputError("--modes", f"{args.modes!r}: give infer and/or train, comma-separated")
    settings = {k: getattr(args, k) for k in ("threads", "device", "repeats", "in_dim", "grid", "grad_checkpointing",
                                              "precision", "malloc")}  # the SpeedSettings given on the command line
    train = parse_overrides(args.train_option, "--train-option", "optimizer_in_backward=true")
    model = parse_overrides(args.model, "--model", "dim=256")
    for key in model:
        if f"model.{key}" in RENAMED:
            raise InputError(f"--model {key}", RENAMED[f"model.{key}"].replace("model.", ""))
    config_from_dict({**train, "model": model})  # an unknown key or a bad value fails here, not in every worker
    parse_malloc(args.malloc, "--malloc")
    run_speed_bench(args.out, spots=args.spots or DEFAULT_SPOTS, genes=args.genes or DEFAULT_GENES,
                    grid_mode=args.grid_mode, modes=modes, max_train_spots=args.max_train_spots, json_lines=args.json,
                    model=model, train=train, **settings)
    plots = ", ".join(p.name for p in sorted(args.out.glob("speed_vs_*.png"))) or "none (one size per axis)"
    print(f"results in {args.out}/speed.json; plots: {plots}")
    return 0


def register_speed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speed", help="train-step / inference time, peak memory and FLOP/s vs spots and genes",
                       description="Each setting runs in a fresh subprocess (so its peak memory is its own) and times a "
                       "dense fp32 matmul beside the model, reporting the model's achieved fraction of it.")
    p.add_argument("--out", type=Path, default=Path("runs/bench-speed"), help="output folder")
    p.add_argument("--spots", type=ints, default=None, help="spots N (default 500,2000,5000,20000,100000)")
    p.add_argument("--genes", type=ints, default=None, help="genes G (default 250,1000,2000,4000)")
    p.add_argument("--grid-mode", choices=["sweep", "full"], default="sweep",
                   help="sweep: N at G=2000 and G at N=5000; full: every (N, G) pair")
    p.add_argument("--modes", default="infer,train", help="infer and/or train")
    p.add_argument("--max-train-spots", type=int, default=20000, help="largest N for train steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda, see --precision)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median)")
    p.add_argument("--in-dim", type=int, default=1024, help="input embedding width (default 1024)")
    p.add_argument("--lattice", dest="grid", choices=["square", "hex"], default="square",
                   help="synthetic slide geometry: square (dense legacy-ST lattice) or hex (Visium, 55 um unit)")
    p.add_argument("--model", action="append", metavar="KEY=VALUE", help="HiSTConfig override, e.g. dim=256")
    p.add_argument("--train-option", action="append", metavar="KEY=VALUE",
                   help="train config key of the train steps, e.g. optimizer_in_backward=true")
    p.add_argument("--grad-checkpointing", choices=GRAD_CHECKPOINTING, default="none",
                   help="recompute activations in backward (train steps): less memory, more time")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU; bf16: autocast on the CPU too (AMX); "
                   "the head and loss stay float32")
    p.add_argument("--malloc", default="default",
                   help="allocator policy, as HIST_ST_MALLOC of hist-st train/predict: default (glibc's adaptive mmap "
                   "threshold), fixed (256K) or fixed:SIZE (e.g. fixed:4M; lower peak RSS, slower), and/or trim "
                   "(malloc_trim after every train step), comma-separated")
    p.add_argument("--json", action="store_true", help="print one JSON line per setting")
    p.set_defaults(func=cmd_speed)
    register_host(sub)
    register_encoder(sub)


def _show(result: dict[str, Any], text: str, out: Path | None) -> int:
    """Print ``text``; write ``result`` as JSON to ``out`` when given."""
    from hist_st.jsonio import write_json

    print(text)
    if out is not None:
        write_json(result, out)
    return 0


def cmd_host(args: argparse.Namespace) -> int:
    from hist_st.bench.host import format_host, host_overhead

    r = host_overhead(section=args.section, root=args.her2st, spots=args.spots, dim=args.dim, heads=args.heads,
                      genes=args.genes, steps=args.steps, threads=args.threads)
    return _show(r, format_host(r), args.out)


def cmd_encoder(args: argparse.Namespace) -> int:
    from hist_st.bench.encoder import encoder_bench, format_encoder

    r = encoder_bench(encoder=args.encoder, weights=args.weights, device=args.device, threads=args.threads,
                      batch_sizes=args.batch_sizes, precisions=tuple(args.precisions.split(",")),
                      rounds=args.rounds, pipeline=not args.no_pipeline, root=args.her2st)
    return _show(r, format_encoder(r), args.out)


def register_host(sub: argparse._SubParsersAction) -> None:
    from hist_st.bench.host import HER2ST

    p = sub.add_parser("host", help="host cost of one training step on a small slide with a tiny model",
                       description="Median time per phase (augmentation, lattice mapping, batch building, forward, "
                       "backward, optimizer) over many steps on her2st C3 (synthetic ~200 spots without the data).")
    p.add_argument("--her2st", type=Path, default=HER2ST, help="her2st folder (default %(default)s)")
    p.add_argument("--section", default="C3", help="her2st section (default C3)")
    p.add_argument("--spots", type=int, default=200, help="spots of the synthetic fallback slide")
    p.add_argument("--dim", type=int, default=32, help="model width (default 32)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--genes", type=int, default=250, help="genes (default 250)")
    p.add_argument("--steps", type=int, default=60, help="timed steps (default 60)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_host)


def register_encoder(sub: argparse._SubParsersAction) -> None:
    from hist_st.bench.host import HER2ST

    p = sub.add_parser("encoder", help="patch encoder throughput (patches/s) per precision and batch size",
                       description="Interleaved timing of the encoder per setting (median), cosine similarity of "
                       "each setting's embeddings to fp32, and the patch-to-embedding loop with and without "
                       "background reading (real her2st patches when present).")
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--weights", default=None, help="encoder weights file")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--batch-sizes", type=ints, default=(32, 64), help="comma-separated (default 32,64)")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (default both; cuda: bf16)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (default 4)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the patch-cutting pipeline rows")
    p.add_argument("--her2st", type=Path, default=HER2ST, help="her2st folder for real patches")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_encoder)
