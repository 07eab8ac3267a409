"""Process memory: keep freed tensor memory from lingering in the C heap (issue 15).

glibc serves an allocation from ``mmap`` only above a threshold that it raises, by default, to the
size of every ``mmap``-ed block freed so far (up to 32 MB). After the first training step most
activation-sized tensors (1-40 MB) therefore come from the heap, whose freed pages are handed back to
the system only from its top: a train step's peak RSS then grows by the fragmented holes (0.25 GB at
N = 5,000 spots, `docs/results/speed.md`). A fixed threshold turns the adjustment off, so every large
tensor is mapped and unmapped on its own and its memory leaves the process as soon as torch frees it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["fixed_mmap_threshold"]

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
