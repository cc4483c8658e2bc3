"""Process-wide CPU settings that change speed, never results.

``retain_freed_memory()`` keeps freed memory inside the process instead of handing it back to the OS.
PyTorch's CPU allocator does not cache: every tensor larger than glibc's mmap threshold (128 KiB to
32 MiB) is a fresh ``mmap`` that the kernel must fault in and zero on first touch, and is unmapped when
freed. STL's fast path allocates about 4x the bytes of a dense matmul per call (the encoded activations
and the r core products besides the output), so it pays this most. On the 2-core VM where our benchmarks
run, re-faulting freed memory also varied from call to call (decode of a 4096^2 output took 14 or 52 ms
depending on which pages it got), which made timings bimodal.

This is what caching allocators do, and what PyTorch's own CPU launcher sets up by default
(``python -m torch.backends.xeon.run_cpu`` preloads tcmalloc, or jemalloc). Here it is done with glibc's
documented ``mallopt`` knobs (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), so nothing needs installing; the same
effect at start-up: ``MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647``. The cost is
memory: the process keeps its peak heap size until it exits.

    from strassenkit import runtime
    runtime.retain_freed_memory()          # before the timed / training loop
    runtime.retain_freed_memory(False)     # back to glibc's thresholds; frees what was kept
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import warnings

__all__ = ["retain_freed_memory", "freed_memory_retained"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP = 2**31 - 1  # the largest value mallopt takes (an int): allocations up to 2 GiB come from the heap
_GLIBC_DEFAULT = 128 * 1024
_state = {"retained": False}


@functools.lru_cache(maxsize=None)
def _libc():
    """glibc's handle with mallopt/malloc_trim, or None (musl, macOS, Windows, ...)."""
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
        lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


def retain_freed_memory(enable: bool = True) -> bool:
    """Keep freed memory in the process (True) or restore glibc's defaults (False); returns success.

    Returns False, with a warning, where glibc's ``mallopt`` is not available; nothing changes then.
    Restoring sets both thresholds back to glibc's 128 KiB start values (glibc then no longer adapts
    the mmap threshold on its own) and returns the kept memory to the OS with ``malloc_trim``.
    """
    lib = _libc()
    if lib is None:
        warnings.warn("retain_freed_memory: glibc mallopt not found on this system; allocator settings unchanged",
                      RuntimeWarning, stacklevel=2)
        return False
    value = _KEEP if enable else _GLIBC_DEFAULT
    ok = bool(lib.mallopt(_M_MMAP_THRESHOLD, value)) and bool(lib.mallopt(_M_TRIM_THRESHOLD, value))
    if ok and not enable:
        lib.malloc_trim(0)
    if ok:
        _state["retained"] = enable
    return ok


def freed_memory_retained() -> bool:
    """True after a successful ``retain_freed_memory()`` (and no ``retain_freed_memory(False)`` since)."""
    return _state["retained"]
