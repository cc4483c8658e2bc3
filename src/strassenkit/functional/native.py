"""Loader for the optional native CPU kernels (``csrc/stl_kernels.cpp``) with a pure-PyTorch fallback.

The kernels are compiled once per machine with ``torch.utils.cpp_extension`` (g++ and ninja) into
``$STRASSENKIT_CACHE/native`` (default ``~/.cache/strassenkit/native``); ``make install`` builds them,
otherwise the first STL call does (about 30 s). If no compiler is available, or
``STRASSENKIT_NATIVE=0`` is set, :func:`available` is False and :mod:`.ops` uses its pure-PyTorch
path, which computes the same values (tests compare both on random shapes).

Outputs larger than 8 MiB are advised to use transparent huge pages (``STRASSENKIT_HUGEPAGES=0`` turns
that off); outputs larger than 4 MiB are written with streaming stores.

    strassenkit native        # build now and print where (python -m strassenkit native)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from .._utils import cache_dir

__all__ = ["available", "load", "enabled", "build_info"]

_SOURCE = Path(__file__).with_name("csrc") / "stl_kernels.cpp"
_state: dict = {}


def enabled() -> bool:
    """False when the user disabled the native kernels with ``STRASSENKIT_NATIVE=0``."""
    return os.environ.get("STRASSENKIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _flags() -> list[str]:
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    flags = ["-O3"]
    if cap.startswith("AVX"):
        flags += ["-mavx2", "-mfma"]
    # OpenMP pragmas in at::parallel_for (torch CPU builds use the OpenMP backend); compile only: the
    # GOMP symbols then resolve to the OpenMP runtime torch itself loaded, so one thread pool is shared.
    if torch.__config__.parallel_info().find("parallel backend: OpenMP") >= 0:
        flags.append("-fopenmp")
    return flags


def _build_dir(name: str) -> Path:
    return cache_dir() / "native" / name


def _name() -> str:
    key = hashlib.sha1(_SOURCE.read_bytes() + " ".join(_flags()).encode() + torch.__version__.encode()).hexdigest()[:12]
    return f"strassenkit_native_{key}"


def clear_stale_lock(build: Path, max_age_s: float = 600.0) -> bool:
    """Remove a build lock left by a killed build (torch would wait for it forever); True if removed.

    torch.utils.cpp_extension serializes concurrent builds (e.g. torchrun processes) with a ``lock``
    file in the build folder; a build takes ~15 s, so a lock older than ``max_age_s`` is stale.
    """
    lock = build / "lock"
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
            return True
    except FileNotFoundError:
        pass
    return False


def _put_ninja_on_path() -> None:
    """torch.utils.cpp_extension runs `ninja` from PATH; use the PyPI ninja package's binary if needed."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI package ships the binary

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def build_info() -> dict:
    """Where the kernels are (to be) built and with which flags."""
    name = _name()
    return {"name": name, "build_dir": str(_build_dir(name)), "flags": _flags(), "source": str(_SOURCE)}


def load(verbose: bool = False) -> bool:
    """Compile (if needed) and load the kernels; True on success. Failures warn once and return False."""
    if "ok" in _state:
        return _state["ok"]
    ok = False
    if enabled():
        try:
            from torch.utils import cpp_extension

            _put_ninja_on_path()
            name = _name()
            build = _build_dir(name)
            build.mkdir(parents=True, exist_ok=True)
            clear_stale_lock(build)
            if not any(build.glob(f"{name}*.so")):
                print(f"strassenkit: compiling native STL kernels into {build} (once, ~30 s)", file=sys.stderr)
            cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=_flags(),
                build_directory=str(build),
                is_python_module=False,
                verbose=verbose,
            )
            ok = hasattr(torch.ops.strassenkit_native, "encode")
            if ok:
                _register_fakes()
        except Exception as err:  # noqa: BLE001 - any build/load failure means: use the fallback
            warnings.warn(
                f"strassenkit: native STL kernels unavailable ({type(err).__name__}: {str(err)[:300]}); "
                "using the slower pure-PyTorch path. Install g++ and ninja, or set STRASSENKIT_NATIVE=0 to silence.",
                RuntimeWarning,
                stacklevel=2,
            )
    _state["ok"] = ok
    return ok


def _register_fakes() -> None:
    """Shape-only (fake) kernels, so that torch.compile/export can trace the custom op's backward,
    which calls these ops (they show up as opaque calls in the traced graph)."""
    lib = "strassenkit_native::"

    @torch.library.register_fake(lib + "encode")
    def _encode_fake(x, enc, n, m, Mt, Kt, want_out, G):
        B, r = x.shape[0], enc.shape[0]
        out = x.new_empty((r, B * Mt, Kt)) if want_out else x.new_empty(0)
        genc = x.new_empty((r, n * m)) if G.numel() > 0 else x.new_empty(0)
        return out, genc

    @torch.library.register_fake(lib + "decode")
    def _decode_fake(P, dec, n, p, B, Mt, M, N):
        return P.new_empty((B, M, N))

    @torch.library.register_fake(lib + "bmm")
    def _bmm_fake(a, b):
        return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


def available() -> bool:
    """True if the native kernels are loaded (compiling them on first call)."""
    return load()

