"""The one benchmark harness of `hist_st.bench.speed`, `efficiency` and `scaling` (docs/CONTRACTS.md:
bench); GB = 1e9 bytes.

```python
from hist_st.bench.harness import PeakMemory, matmul_gflops, run_isolated, timed_steps
with PeakMemory("cpu") as mem:
    seconds = timed_steps(step, "cpu", repeats=3)       # [3] seconds, after one warm-up step
mem.record("train_")   # {"train_rss_before_gb", "train_rss_peak_gb", "train_rss_delta_gb"} (+ CUDA keys)
rec = run_isolated("hist_st.bench.speed", {"spots": 500, ...}, timeout=600, threads=2)
```
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
import torch

from hist_st.errors import InputError
from hist_st.memory import trim_heap

__all__ = ["GB", "PeakMemory", "matmul_gflops", "run_isolated", "timed_steps"]

GB = 1e9


def timed_steps(step: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` untimed ones, synchronised (CUDA)."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else lambda: None
    times = []
    for i in range(warmup + repeats):
        sync()
        t = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def matmul_gflops(
    device: str, size: int = 2048, repeats: int = 5, dtype: str = "float32", budget_s: float = 10.0
) -> float:
    """Dense ``size x size`` matmul GFLOP/s of this process now (median of ``repeats`` after a warm-up).

    A 512 x 512 product is timed first; when ``size`` would take longer than ``budget_s`` at that rate, that
    product's rate is the answer. On a CPU without native bfloat16 (no AVX512-BF16 or AMX) PyTorch multiplies
    bfloat16 in a reference loop at about 1 GFLOP/s, where 2048 x 2048 takes minutes.
    """
    probe = min(size, 512)
    a, b = (torch.randn(probe, probe, device=device).to(getattr(torch, dtype)) for _ in range(2))
    times = timed_steps(lambda: a @ b, device, 2)
    if (repeats + 1) * 2 * size**3 / (2 * probe**3 / min(times)) > budget_s:
        return 2 * probe**3 / statistics.median(times) / 1e9
    a, b = (torch.randn(size, size, device=device).to(getattr(torch, dtype)) for _ in range(2))
    return 2 * size**3 / statistics.median(timed_steps(lambda: a @ b, device, repeats)) / 1e9


class PeakMemory:
    """Peak memory of this process inside a ``with`` block (one phase of a measurement), in bytes: the
    resident set size before it and its peak inside it (``rss_before``, ``rss_peak``; Linux >= 4.0 resets the
    kernel's high-water mark on entry, so the peak is the phase's, elsewhere the process's so far) and on CUDA
    the peak allocated and reserved memory inside it (``cuda_allocated``, ``cuda_reserved``)."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.rss_before = self.rss_peak = self.cuda_allocated = self.cuda_reserved = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        trim_heap()  # freed heap pages go back, so the phase's RSS counts its own allocations
        self.rss_before = psutil.Process().memory_info().rss  # before CUDA starts: its context counts
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark to the current RSS
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:  # the peak since the reset (Linux: VmHWM), else since the process started
            with open("/proc/self/status") as f:
                peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):  # ru_maxrss: bytes on macOS, KiB elsewhere
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = maxrss if sys.platform == "darwin" else maxrss * 1024
        self.rss_peak = max(peak, psutil.Process().memory_info().rss, self.rss_before)
        if self.cuda:
            self.cuda_allocated = torch.cuda.max_memory_allocated()
            self.cuda_reserved = torch.cuda.max_memory_reserved()

    def record(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}rss_before_gb``, ``rss_peak_gb``, ``rss_delta_gb`` and on CUDA ``alloc_gb``, ``reserved_gb``."""
        out = {f"{prefix}rss_before_gb": self.rss_before / GB, f"{prefix}rss_peak_gb": self.rss_peak / GB,
               f"{prefix}rss_delta_gb": (self.rss_peak - self.rss_before) / GB}
        if self.cuda:
            out.update({f"{prefix}alloc_gb": self.cuda_allocated / GB, f"{prefix}reserved_gb": self.cuda_reserved / GB})
        return out


def run_isolated(module: str, spec: Mapping[str, Any], *, timeout: float | None, threads: int = 0,
                 label: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``module.worker(spec)`` in a fresh ``python -m hist_st.bench.harness`` process, so that one
    measurement's allocations, caches and imports never count against another's.

    Args:
        module: A `hist_st.bench` module with ``worker(spec: dict) -> dict`` (e.g. ``hist_st.bench.speed``).
        spec: The JSON-able measurement spec.
        timeout: Seconds before the process is killed (None: no limit).
        threads: OMP/MKL threads of the process (0: the environment's).
        label: What an error record holds besides ``error`` (default: ``spec``).

    Returns:
        The worker's record, or ``{**label, "error": "timed out after N s" | "exit C: <last stderr lines>"}``.
    """
    label = dict(spec if label is None else label)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    with tempfile.TemporaryDirectory(prefix="hist-st-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec, default=str))
        cmd = [sys.executable, "-m", "hist_st.bench.harness", module, str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**label, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_path.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return {**label, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
        return json.loads(out_path.read_text())


def _main(argv: list[str]) -> None:
    if len(argv) != 3 or not argv[0].startswith("hist_st.bench."):
        sys.exit("usage: python -m hist_st.bench.harness hist_st.bench.MODULE SPEC.json RESULT.json")
    try:
        rec = importlib.import_module(argv[0]).worker(json.loads(Path(argv[1]).read_text()))
    except InputError as exc:  # the message, without a traceback, ends the error record
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    Path(argv[2]).write_text(json.dumps(rec))


if __name__ == "__main__":
    _main(sys.argv[1:])
