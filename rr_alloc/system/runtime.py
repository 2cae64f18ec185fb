"""Process-level settings for the command line and the studies (never applied on import).

glibc serves every allocation above its mmap threshold (128 KB, raised
dynamically to 32 MB at most) with a fresh ``mmap`` and unmaps it on free, so
each large activation costs the kernel a round of page faults and zeroing.
The RR profile's probe outputs are ``G + 1`` times a layer's output (about
100 MB per call at batch 256 on CIFAR ResNets): measured with
``studies/bench_profile.py`` on 2 cores, 2.7-4.6 M page faults per profile and
kernel CPU time equal to 72% of its wall time. Raising the mmap and trim
thresholds keeps freed blocks on the heap for reuse. The price is that a process keeps its peak heap until it exits,
which suits a command-line run and not a long-lived host process, hence
opt-in: ``python -m rr_alloc`` and the studies call :func:`tune_malloc`,
library users may. ``RR_ALLOC_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

__all__ = ["available_memory_bytes", "release_free_memory", "tune_malloc"]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_applied: bool | None = None


def _glibc(name: str, argtypes: list, restype: type) -> Callable[..., int] | None:
    """glibc's function ``name`` with its C signature, or ``None`` off Linux or on another libc (musl: its
    allocator is left alone)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep blocks up to ``threshold`` bytes on glibc's heap (no mmap/munmap per large tensor).

    Returns whether the setting is in effect; a no-op returning ``False`` off
    glibc, when ``RR_ALLOC_MALLOC_TUNING=0`` or when ``mallopt`` refuses.
    Idempotent.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("RR_ALLOC_MALLOC_TUNING", "1") == "0":
        return False
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:
        return False
    # trim threshold first: with it at 2x the mmap threshold freed heap tops are kept, not returned
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, min(2 * threshold, 2**31 - 1)) and mallopt(_M_MMAP_THRESHOLD, threshold))
    return _applied


def release_free_memory(device: object = "cpu") -> None:
    """Hand back to the system the memory this process has freed but keeps for reuse: glibc's free heap (which
    :func:`tune_malloc` keeps up to its threshold) or PyTorch's CUDA cache. A measure of free memory taken next
    then counts it; without this, a later repair in the same process (``best-rule`` runs five) counts an
    earlier one's freed activations as taken and caps its cache lower than the memory allows."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        return
    trim = _glibc("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    if trim is not None:
        trim(0)


def available_memory_bytes(device: object = "cpu") -> float:
    """Memory free for new tensors now: the GPU's free memory for a CUDA device, else the kernel's
    ``MemAvailable`` (what can be allocated without swapping), else free physical pages."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return float(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
        return 8e9
