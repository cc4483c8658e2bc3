"""``strassenkit algorithms``: list the catalogue and verify every entry exactly."""

from __future__ import annotations

import time


def add_arguments(parser) -> None:
    parser.add_argument("--no-verify", action="store_true", help="list only, skip the exact verification")


def run(args) -> int:
    from ..algorithms import available, get

    print(f"{'name':<22} {'format':<10} {'rank':>5} {'speedup':>8} {'ternary':>8} {'verified':>9}  source")
    failures = 0
    for name in available():
        alg = get(name)
        t0 = time.perf_counter()
        ok = None if args.no_verify else alg.verify()
        failures += ok is False
        fmt = "<{},{},{}>".format(*alg.format)
        speed = alg.n * alg.m * alg.p / alg.rank
        print(
            f"{name:<22} {fmt:<10} {alg.rank:>5} {speed:>7.2f}x {str(alg.is_ternary()):>8} "
            f"{'-' if ok is None else str(ok):>9}  {alg.source}"
            + ("" if ok is None else f" ({time.perf_counter() - t0:.2f}s)")
        )
    return 1 if failures else 0
