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

``machine_info()`` names what a timing ran on (CPU model, SIMD flags, cores, the native kernels' code path):
benchmarks write it beside every speed ratio.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import warnings

__all__ = ["retain_freed_memory", "freed_memory_retained", "machine_info"]

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


def machine_info() -> dict:
    """The CPU (model name, SIMD flags), cores, torch version and the STL kernels' code path: the header of
    every benchmark (speed ratios depend on them; our 2-core machines differ between sessions)."""
    import os
    import platform

    import torch

    from .functional import native
    from .functional.ops import native_low_precision

    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": model, "simd": simd, "cores": os.cpu_count(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16_gemm": native_low_precision("cpu"), "loadavg_start": load,
        "native_code_path": native.code_path() or "unavailable (pure-PyTorch kernels)",
        "native_flags": " ".join(native.build_info()["flags"]) if native.available() else "",
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
    }
