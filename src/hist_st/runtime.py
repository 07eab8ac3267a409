"""What a run needs from the process it runs in: the device, seeds, torch threads and package versions.

One place for each, used by training, the baselines, the experiments and the CLI alike.

```python
from hist_st.runtime import resolve_device, seed_everything, set_threads, package_versions
device = resolve_device("auto")            # torch.device: CUDA when available, else the CPU
rng = seed_everything(0)                   # Python, NumPy and torch seeded; a NumPy Generator back
set_threads(2)                             # torch CPU threads (0 or None: torch's default)
```
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch

from hist_st.errors import InputError

__all__ = ["DeviceError", "resolve_device", "device_name", "seed_everything", "set_threads", "package_versions"]


class DeviceError(InputError, RuntimeError):
    """An unknown or unavailable device: an `InputError` (exit code 2 in the CLI) and a RuntimeError."""


def resolve_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """A device preference as a `torch.device`.

    Args:
        pref: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:<index>``.
        local_rank: This process's rank on its machine; ``cuda`` picks GPU ``local_rank`` (modulo the
            GPUs visible), so each rank of a ``torchrun`` job has its own.

    Raises:
        DeviceError: An unknown device name, or CUDA asked for where there is none.
    """
    pref = str(pref)
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device", "device=cuda requested but CUDA is not available")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    try:
        device = torch.device(pref)
    except (RuntimeError, TypeError):
        raise DeviceError("device", f"unknown device {pref!r}; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device", f"device={pref} requested but CUDA is not available")
    return device


def device_name(device: str | torch.device) -> str:
    """A device in words: the CUDA card's name, or the CPU model, visible cores and torch threads."""
    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {model or 'unknown'} ({os.cpu_count()} cores visible, {threads} torch threads)"


def native_bf16_cpu() -> bool | None:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) as PyTorch sees it; None when this
    torch cannot tell. Without it PyTorch runs bfloat16 products in a reference loop (~1 GFLOP/s)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(p) for p in probes):
        return None
    return any(p() for p in probes)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy (the legacy global generator) and torch (CPU and CUDA).

    Returns:
        A NumPy generator seeded with ``seed``, for local use.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def set_threads(n: int | None, option: str = "--threads") -> None:
    """Use ``n`` torch CPU threads; None or 0 leaves torch's default.

    Raises:
        InputError: A negative count, naming ``option``.
    """
    if n is None or n == 0:
        return
    if n < 0:
        raise InputError(option, f"must be >= 1 (or 0 for torch's default), got {n}")
    torch.set_num_threads(int(n))


def package_versions() -> dict[str, str]:
    """Versions of Python, hist-st and the packages that shape its numbers (``not installed`` when absent)."""
    out = {"python": platform.python_version()}
    for name in ("hist-st", "torch", "numpy", "scipy", "anndata", "scanpy", "scikit-learn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out
