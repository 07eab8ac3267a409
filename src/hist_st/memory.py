"""Process memory: keep freed tensor memory from lingering in the C heap (issue 15).

glibc serves an allocation from ``mmap`` only above a threshold that it raises, by default, to the
size of every ``mmap``-ed block freed so far (up to 32 MB). After the first training step most
activation-sized tensors (1-40 MB) therefore come from the heap, whose freed pages are handed back to
the system only from its top: a train step's peak RSS then grows by the fragmented holes (0.25 GB at
N = 5,000 spots, `docs/results/speed.md`). A fixed threshold turns the adjustment off, so every large
tensor is mapped and unmapped on its own and its memory leaves the process as soon as torch frees it.

That costs time: every activation-sized allocation becomes a fresh mapping whose pages fault in again
(measured idle on 2 threads, N = 5,000: inference 0.80 -> 1.27 s, train step 2.61 -> 3.83 s). So it is
opt-in: ``HIST_ST_MALLOC=fixed`` in the environment makes `hist-st train` / `predict` apply it
(`malloc_policy`); by default glibc keeps its adaptive threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["fixed_mmap_threshold", "malloc_policy", "MALLOC_ENV"]

#: Environment variable choosing the allocator policy of `hist-st train` / `predict`: ``fixed`` or ``default``.
MALLOC_ENV = "HIST_ST_MALLOC"

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
DEFAULT_THRESHOLD = 256 * 1024


@functools.cache
def fixed_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own ``mmap`` (glibc only; once per process).

    Args:
        nbytes: The fixed threshold in bytes.

    Returns:
        True when glibc accepted the setting; False elsewhere (macOS, musl, Windows): nothing changes.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def malloc_policy() -> str:
    """Apply the allocator policy that ``HIST_ST_MALLOC`` asks for and return it.

    Returns:
        ``"fixed"`` (`fixed_mmap_threshold` applied: lower peak RSS, slower) or ``"default"`` (glibc's
        adaptive threshold, the default).

    Raises:
        ValueError: Any other value, naming the variable.
    """
    value = os.environ.get(MALLOC_ENV, "default").strip().lower() or "default"
    if value not in ("fixed", "default"):
        raise ValueError(f"{MALLOC_ENV}={value!r}: use fixed (lower peak memory, slower) or default")
    if value == "fixed":
        fixed_mmap_threshold()
    return value
