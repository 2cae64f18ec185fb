"""Process settings (rr_alloc/runtime.py): opt-in, idempotent, switchable off."""

from rr_alloc.system import runtime

_PROBE = """
import ctypes
from rr_alloc.system.runtime import tune_malloc
on = tune_malloc()
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
print(on, libc.mallinfo2().hblkhd - before >= 64 << 20)
"""


def _probe(**env: str) -> str:
    """Whether tuning is on, and whether a 64 MB block was served by mmap, in a fresh process."""
    import os
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return r.stdout.strip()


def test_tuned_malloc_keeps_large_blocks_on_the_heap():
    """With tuning a 64 MB block comes from the heap (reused, no page faults per tensor); without it, from mmap."""
    import ctypes
    import platform

    import pytest

    if platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc 2.33+ only: the setting is a no-op elsewhere")
    assert _probe() == "True False"
    assert _probe(RR_ALLOC_MALLOC_TUNING="0") == "False True"


def test_tune_malloc_idempotent(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", None)
    first = runtime.tune_malloc()
    assert runtime.tune_malloc() is first


def test_tune_malloc_env_off(monkeypatch):
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setenv("RR_ALLOC_MALLOC_TUNING", "0")
    assert runtime.tune_malloc() is False


def test_import_does_not_tune(monkeypatch):
    import importlib

    monkeypatch.setattr(runtime, "_applied", None)
    importlib.reload(importlib.import_module("rr_alloc"))
    assert runtime._applied is None


_RELEASE_PROBE = """
import torch
from rr_alloc.repair.propagate import activation_cap
from rr_alloc.system.runtime import tune_malloc

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

tune_malloc()
block = torch.empty(768 << 20, dtype=torch.uint8).fill_(1)  # below the tuned mmap threshold: on the heap
del block
kept = rss()
activation_cap("cpu")
print(kept - rss() >= 384 << 20)
"""


def test_activation_cap_counts_memory_the_process_freed():
    """A repair's cache cap is taken after the heap a previous repair freed is handed back (tuned malloc keeps
    it otherwise, and the next repair would see it as taken)."""
    import ctypes
    import platform
    import subprocess
    import sys

    import pytest

    if platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL("libc.so.6"), "malloc_trim"):
        pytest.skip("glibc only: elsewhere the allocator returns memory itself")
    r = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "True"
