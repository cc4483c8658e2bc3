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
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from .._utils import cache_dir

__all__ = ["available", "load", "enabled", "build_info", "isa", "cpu_flags", "code_path", "pool_stats", "empty_pool",
           "set_pool_limit"]

_SOURCE = Path(__file__).with_name("csrc") / "stl_kernels.cpp"
_state: dict = {}


def enabled() -> bool:
    """False when the user disabled the native kernels with ``STRASSENKIT_NATIVE=0``."""
    return os.environ.get("STRASSENKIT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


# Code paths, best first: the compiler flags of each and the CPU flags it needs (/proc/cpuinfo names).
ISAS = {
    "avx512": (["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
               {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma"}),
    "avx2": (["-mavx2", "-mfma"], {"avx2", "fma"}),
    "generic": ([], set()),
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; elsewhere derived from torch's CPU capability)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return ISAS["avx512"][1] if cap.startswith("AVX512") else ISAS["avx2"][1] if cap.startswith("AVX2") else set()


def isa() -> str:
    """The code path for this CPU: the best of ISAS its flags allow, or ``STRASSENKIT_ISA`` if it runs here."""
    have = cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "generic"
    want = os.environ.get("STRASSENKIT_ISA", "auto").strip().lower()
    if want in ISAS and ISAS[want][1] <= have:
        return want
    if want not in ("", "auto"):
        warnings.warn(f"STRASSENKIT_ISA={want!r}: not one of {list(ISAS)} that this CPU runs; choosing automatically",
                      RuntimeWarning, stacklevel=2)
    return next(name for name, (_f, need) in ISAS.items() if need <= have)


def _flags() -> list[str]:
    flags = ["-O3", *ISAS[isa()][0]]
    vec = os.environ.get("STRASSENKIT_VEC_BYTES", "").strip()  # testing: e.g. the 64-byte code on an AVX2 CPU
    if vec in ("16", "32", "64"):
        flags.append(f"-DSTRASSENKIT_VEC_BYTES={vec}")
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
    """Where the kernels are (to be) built, with which flags, for which code path (``isa``)."""
    name = _name()
    return {"name": name, "build_dir": str(_build_dir(name)), "flags": _flags(), "source": str(_SOURCE), "isa": isa()}


def code_path() -> str:
    """The loaded kernels' code path as compiled, e.g. "avx2/256" (ISA / vector bits), or "" if not loaded."""
    return str(torch.ops.strassenkit_native.isa()) if load() else ""


def pool_stats() -> dict:
    """The native kernels' output pool: bytes cached and in use, hits, misses, the cap (bytes)."""
    if not load():
        return {}
    cached, in_use, hits, misses, limit = torch.ops.strassenkit_native.pool_stats()
    return {"cached_bytes": cached, "in_use_bytes": in_use, "hits": hits, "misses": misses, "limit_bytes": limit}


def empty_pool() -> None:
    """Return the pool's cached (free) blocks to the OS; tensors in use are not affected."""
    if load():
        torch.ops.strassenkit_native.pool_empty()


def set_pool_limit(mb: int) -> None:
    """Cap the bytes the pool keeps cached (0: no pool, outputs come from PyTorch's allocator)."""
    if load():
        torch.ops.strassenkit_native.pool_set_limit(int(mb))


def _self_check() -> str | None:
    """Run every kernel once on small float64 operands against the einsum reference; None if all agree.

    Guards a code path that could not be run where it was written (the AVX-512 build was only compiled,
    and its logic run with 64-byte vectors on AVX2): a wrong result disables the kernels, loudly."""
    from torch.utils._python_dispatch import _disable_current_modes

    from .stl import stl_apply_reference

    ns = torch.ops.strassenkit_native
    g = torch.Generator().manual_seed(0)
    old = torch.get_num_threads()
    # load() may first run anywhere (no_grad, inference_mode, a fake or meta-device mode): check on plain tensors
    with torch.inference_mode(False), torch.enable_grad(), _disable_current_modes(), torch.device("cpu"):
        return _self_check_body(ns, g, old, stl_apply_reference)


def _self_check_body(ns, g, old, stl_apply_reference):
    try:
        for threads in sorted({1, min(2, old)}):
            torch.set_num_threads(threads)
            for (n, m, p), (B, M, K, N, r) in (((4, 4, 4), (2, 37, 70, 45, 24)), ((2, 3, 5), (3, 9, 13, 11, 7))):
                Mt, Kt, Nt = -(-M // n), -(-K // m), -(-N // p)
                x, gy = torch.randn(B, M, K, dtype=torch.float64, generator=g), torch.randn(B, M, N, dtype=torch.float64, generator=g)
                ps = [torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_() for s in ((r, Kt, Nt), (r, n * m), (n * p, r))]
                xr = x.clone().requires_grad_()
                ref = stl_apply_reference(xr, *ps, (n, m, p), N)
                ref.backward(gy)
                y, xh, prod = ns.fused_forward(x, *[t.detach() for t in ps], n, m, p, N, True)
                grads = ns.fused_backward(gy, x, *[t.detach() for t in ps], xh, prod, n, m, p, True, True, True, True)
                xh2, _ = ns.encode(x, ps[1].detach(), n, m, Mt, Kt, True, x.new_empty(0))
                y2 = ns.decode(ns.bmm(xh2, ps[0].detach()), ps[2].detach(), n, p, B, Mt, M, N)
                for what, a, b in (("fused y", y, ref), ("decode", y2, ref), ("grad x", grads[0], xr.grad),
                                   ("grad w_hat", grads[1], ps[0].grad), ("grad enc", grads[2], ps[1].grad),
                                   ("grad dec", grads[3], ps[2].grad)):
                    err = (a - b).abs().max().item() / max(1e-30, b.abs().max().item())
                    if not err <= 1e-10:
                        return f"{what} off by {err:.2g} (format {(n, m, p)}, {threads} threads)"
    finally:
        torch.set_num_threads(old)
    return None


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
                _state["ok"] = True  # the self-check calls the kernels
                try:
                    bad = _self_check()
                except Exception:  # noqa: BLE001 - the check could not run in this context: no verdict
                    bad = None
                if bad:
                    ok = False
                    warnings.warn(f"strassenkit: the native STL kernels ({code_path()}, flags {_flags()}) failed their "
                                  f"self-check: {bad}; using the pure-PyTorch path. Please report this; "
                                  f"STRASSENKIT_ISA=avx2 or generic selects another build.", RuntimeWarning, stacklevel=2)
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
    def _decode_fake(P, dec, n, p, B, Mt, M, N, bias=None):
        return P.new_empty((B, M, N))

    @torch.library.register_fake(lib + "encode_bf16")
    def _encode_bf16_fake(x, enc, n, m, Mt, Kt, want_out, G):
        r = enc.shape[0]
        out = x.new_empty((r, x.shape[0] * Mt, Kt)) if want_out else x.new_empty(0)
        genc = enc.new_empty((r, n * m)) if G.numel() > 0 else enc.new_empty(0)
        return out, genc

    @torch.library.register_fake(lib + "decode_bf16")
    def _decode_bf16_fake(P, dec, n, p, B, Mt, M, N, bias=None):
        return P.new_empty((B, M, N))

    @torch.library.register_fake(lib + "bmm")
    def _bmm_fake(a, b):
        return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))

    @torch.library.register_fake(lib + "fused_forward")
    def _fused_forward_fake(x, w_hat, enc, dec, n, m, p, N, save, bias=None):
        B, M, _K = x.shape
        r, Kt, Nt = w_hat.shape
        Mt = -(-M // n)
        y = x.new_empty((B, M, N))
        if not save:
            return y, x.new_empty(0), x.new_empty(0)
        return y, x.new_empty((r, B * Mt, Kt)), x.new_empty((r, B * Mt, Nt))

    @torch.library.register_fake(lib + "fused_backward")
    def _fused_backward_fake(gy, x, w_hat, enc, dec, x_hat, prod, n, m, p, need_x, need_w, need_enc, need_dec):
        def shaped(want, like):
            return x.new_empty(like.shape) if want else x.new_empty(0)

        return shaped(need_x, x), shaped(need_w, w_hat), shaped(need_enc, enc), shaped(need_dec, dec)


def available() -> bool:
    """True if the native kernels are loaded (compiling them on first call)."""
    return load()

