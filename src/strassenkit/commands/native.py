"""``strassenkit native``: build the native C++ STL kernels now (else they build on first use) and report."""

from __future__ import annotations


def add_arguments(parser) -> None:
    """``strassenkit native``: build the kernels now (``make install`` does) and report."""
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")


def run(args) -> int:
    from ..functional.native import build_info, enabled, load

    if not enabled():
        print("STRASSENKIT_NATIVE=0: native kernels disabled (pure-PyTorch path)")
        return 0
    ok = load(verbose=args.verbose)
    info = build_info()
    print(f"native STL kernels: {'ok' if ok else 'NOT available (pure-PyTorch fallback)'} - {info['build_dir']}")
    return 0 if ok else 1
