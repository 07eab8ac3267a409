"""The allocator policy of train/predict: glibc's default unless HIST_ST_MALLOC asks otherwise."""

import ctypes
import os
import subprocess
import sys

import pytest

from hist_st.errors import InputError
from hist_st.memory import (
    MALLOC_ENV,
    THP_ENV,
    MallocPolicy,
    huge_pages_by_default,
    malloc_policy,
    parse_malloc,
    trim_heap,
)


def test_default_policy_leaves_glibc_alone(monkeypatch):
    monkeypatch.delenv(MALLOC_ENV, raising=False)
    assert malloc_policy() == MallocPolicy() and str(malloc_policy()) == "default"


def test_fixed_policy_is_applied(monkeypatch):
    monkeypatch.setenv(MALLOC_ENV, "Fixed")
    assert str(malloc_policy()) == "fixed" and malloc_policy().threshold == 256 * 1024


@pytest.mark.parametrize(("text", "threshold", "trim", "canonical"), [
    ("fixed:4M", 4 << 20, False, "fixed:4M"), ("fixed:512k,trim", 512 << 10, True, "fixed:512K,trim"),
    ("trim", None, True, "trim"), ("default", None, False, "default"), ("fixed:1048576", 1 << 20, False, "fixed:1M"),
])  # fmt: skip
def test_policies_parse_and_print(text, threshold, trim, canonical):
    policy = parse_malloc(text)
    assert (policy.threshold, policy.trim, str(policy)) == (threshold, trim, canonical)
    assert parse_malloc(str(policy)) == policy


@pytest.mark.parametrize("text", ["tiny", "fixed:64M", "fixed:1", "fixed:4G"])
def test_unknown_policy_names_the_variable(monkeypatch, text):
    monkeypatch.setenv(MALLOC_ENV, text)
    with pytest.raises(InputError, match=f"HIST_ST_MALLOC: '{text}'"):
        malloc_policy()


def test_a_fixed_threshold_returns_freed_tensors_to_the_system():
    """With ``fixed:1M`` a freed 8 MB tensor leaves the process; its pages do not stay resident."""
    code = (
        "import os, torch\n"
        "from hist_st.memory import apply_malloc, parse_malloc\n"
        "apply_malloc(parse_malloc('fixed:1M'))\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "keep = [torch.ones(1 << 21) for _ in range(8)]\n"  # 8 x 8 MB, then free them
        "before = rss(); del keep; after = rss()\n"
        "print((before - after) / 2**20)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) > 60  # MB released of 64


def test_trim_heap_runs():
    if not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("no glibc malloc_trim here")
    assert trim_heap() in (True, False)


def test_huge_pages_on_by_default_unless_the_environment_chose(monkeypatch):
    monkeypatch.delenv(THP_ENV, raising=False)
    assert huge_pages_by_default() == "1"
    monkeypatch.setenv(THP_ENV, "0")
    assert huge_pages_by_default() == "0"


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "absent"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "absent"


@pytest.mark.parametrize("value", ["1", "0"])
def test_huge_pages_switch_reaches_torch(value):
    """A 64 MB tensor of a process started with the switch on lies (partly) on huge pages; with it off, on
    none (where the kernel only honours ``madvise``)."""
    if _thp_mode() != "madvise":
        pytest.skip(f"transparent huge pages are {_thp_mode()!r} here, not 'madvise'")
    code = (
        "import torch\n"
        "x = torch.ones(1 << 24)\n"  # 64 MB, touched
        "rows = [l for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages:')]\n"
        "print(int(rows[0].split()[1]))\n"
    )
    env = {**os.environ, THP_ENV: value}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    huge_kb = int(out.stdout.strip().splitlines()[-1])
    assert (huge_kb > 0) == (value == "1")
