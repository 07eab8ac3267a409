"""Process memory: keep freed tensor memory from lingering in the C heap (issue 15).

glibc serves an allocation from ``mmap`` only above a threshold that it raises, by default, to the
size of every ``mmap``-ed block freed so far (up to 32 MB). After the first training step most
activation-sized tensors (1-40 MB) therefore come from the heap, whose freed pages are handed back to
the system only from its top: a train step's peak RSS then grows by the fragmented holes (0.25 GB at
N = 5,000 spots, `docs/results/speed.md`). A fixed threshold turns the adjustment off, so every tensor
above it is mapped and unmapped on its own and its memory leaves the process as soon as torch frees it.

That costs time: every such allocation becomes a fresh mapping whose pages fault in again (measured
idle on 2 threads, N = 5,000, threshold 256 KB: inference 0.80 -> 1.27 s, train step 2.61 -> 3.83 s).
``HIST_ST_MALLOC`` in the environment chooses the policy of `hist-st train` / `predict`
(`malloc_policy`), a comma-separated list:

- ``default``: glibc's adaptive threshold (the default);
- ``fixed`` or ``fixed:SIZE``: the threshold fixed at 256 KB or at SIZE (bytes, or with a K / M suffix,
  e.g. ``fixed:4M``: tensors of 4 MB and more are mapped, smaller ones come from the heap);
- ``trim``: `trim_heap` (``malloc_trim(0)``) after every optimiser step, which returns the heap's free
  pages to the system between steps.

Blocks above 32 MB are always mapped afresh (glibc refuses a larger threshold), and so are many smaller
ones while the threshold adapts: at N = 5,000 spots a train step faulted in 0.4-0.6 GB of 4 KB pages
(about 130,000 faults, 0.1-0.2 s). ``hist-st`` therefore turns on PyTorch's own switch for transparent
huge pages (`huge_pages_by_default`, ``THP_MEM_ALLOC_ENABLE=1``): CPU tensors of 2 MB and more are
aligned to 2 MB and ``madvise``-d, so they fault in 2 MB at a time (10x fewer faults; a train step 3-5%
faster on 2 idle threads, 13% with the other core busy; about 0.01 GB more in inference:
`docs/results/speed.md`). ``THP_MEM_ALLOC_ENABLE=0`` in the environment keeps it off; a kernel with
transparent huge pages set to ``never`` ignores it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
from dataclasses import dataclass

from hist_st.errors import InputError

__all__ = ["fixed_mmap_threshold", "malloc_policy", "parse_malloc", "apply_malloc", "trim_heap", "MallocPolicy",
           "MALLOC_ENV", "THP_ENV", "huge_pages_by_default"]

#: Environment variable choosing the allocator policy of `hist-st train` / `predict` (see the module docstring).
MALLOC_ENV = "HIST_ST_MALLOC"

#: PyTorch's switch for CPU tensors of 2 MB and more on transparent huge pages; torch reads it once, at its
#: first CPU allocation.
THP_ENV = "THP_MEM_ALLOC_ENABLE"

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
DEFAULT_THRESHOLD = 256 * 1024
_MAX_THRESHOLD = 32 * 1024 * 1024  # glibc's HEAP_MAX / 2 on 64-bit: mallopt refuses larger values
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


@dataclass(frozen=True)
class MallocPolicy:
    """An allocator policy: ``threshold`` (fixed mmap threshold in bytes, None = glibc's adaptive one) and
    ``trim`` (`trim_heap` after every optimiser step)."""

    threshold: int | None = None
    trim: bool = False

    def __str__(self) -> str:
        parts = [] if self.threshold is None else [
            "fixed" if self.threshold == DEFAULT_THRESHOLD else f"fixed:{_size_text(self.threshold)}"]
        parts += ["trim"] if self.trim else []
        return ",".join(parts) or "default"


def _size_text(nbytes: int) -> str:
    for suffix, unit in (("M", 1024 * 1024), ("K", 1024)):
        if nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return str(nbytes)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def fixed_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own ``mmap`` (glibc only; the last call wins).

    Args:
        nbytes: The fixed threshold in bytes.

    Returns:
        True when glibc accepted the setting; False elsewhere (macOS, musl, Windows): nothing changes.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``).

    Returns:
        True when memory was released; False when none was, or without glibc.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def parse_malloc(value: str, source: str = MALLOC_ENV) -> MallocPolicy:
    """Parse a policy such as ``default``, ``fixed``, ``fixed:4M``, ``fixed:8M,trim`` (case-insensitive).

    Args:
        value: The policy text.
        source: What to name in an error (the variable or option it came from).

    Raises:
        InputError: An unknown item or a size outside 4K..32M, naming ``source`` and the value.
    """
    threshold, trim = None, False
    for item in (value or "default").strip().lower().split(","):
        item = item.strip()
        m = re.fullmatch(r"fixed(?::(\d+)([km]?)b?)?", item)
        if item in ("default", ""):
            continue
        if item == "trim":
            trim = True
        elif m is not None:
            threshold = DEFAULT_THRESHOLD if m.group(1) is None else int(m.group(1)) * _UNITS[m.group(2)]
            if not 4096 <= threshold <= _MAX_THRESHOLD:
                raise InputError(source, f"{value!r}: the fixed mmap threshold must lie in 4K..32M")
        else:
            raise InputError(source, f"{value!r}: use default, fixed (256K), fixed:SIZE (e.g. fixed:4M; lower peak "
                             f"memory, slower) and/or trim, comma-separated")
    return MallocPolicy(threshold, trim)


def apply_malloc(policy: MallocPolicy) -> MallocPolicy:
    """Apply ``policy``'s threshold to this process (its ``trim`` is the training loop's to honour)."""
    if policy.threshold is not None:
        fixed_mmap_threshold(policy.threshold)
    return policy


def malloc_policy() -> MallocPolicy:
    """Apply the allocator policy that ``HIST_ST_MALLOC`` asks for and return it.

    Returns:
        The policy (`MallocPolicy`; ``str()`` gives its canonical text: ``"default"``, ``"fixed"``, ...).

    Raises:
        InputError: A value `parse_malloc` refuses, naming the variable.
    """
    return apply_malloc(parse_malloc(os.environ.get(MALLOC_ENV, "default")))


def huge_pages_by_default() -> str:
    """Turn on PyTorch's transparent-huge-page allocation (`THP_ENV`) unless the environment already chose.

    The ``hist-st`` command's first step, before it imports torch: torch reads the variable once, so a
    process that has already allocated tensors keeps its setting, and only the processes it starts (bench
    workers, DDP ranks) see the new one. Where to put a tensor does not change any computed value.

    Returns:
        The value in effect: ``"1"``, or what the environment held.
    """
    return os.environ.setdefault(THP_ENV, "1")
