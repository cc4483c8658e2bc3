"""Count the bad-input table of issue #13 by verdict: ``python tests/bad_inputs_report.py [-v]``.

Runs every row of :mod:`bad_input_cases` once (one thread, fixed seeds; about a minute) and prints
``N cases: 0 silent-wrong, 0 crash, k vague`` plus the count of each verdict; ``-v`` lists every row,
``--json PATH`` writes the rows. Exit status 1 if any row is silent-wrong or a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("STRASSENKIT_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache",
                                                         "strassenkit-tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="list every case with its verdict")
    ap.add_argument("--json", default=None, help="write [{id, expected, verdict, detail}] here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from bad_input_cases import CASES, counts, verdict

    t0 = time.perf_counter()
    results = []
    for case in CASES:
        v, detail = verdict(case)
        results.append((case, v, detail))
        if args.verbose or v in ("silent-wrong", "crash", "vague"):
            print(f"{v:<13} {case.id}" + (f"\n              {detail[:300]}" if v != case.expected else ""))
    c = counts(results)
    print(f"{len(results)} cases: {c['silent-wrong']} silent-wrong, {c['crash']} crash, {c['vague']} vague "
          f"({c['correct']} correct, {c['clear error']} clear error; {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"id": cs.id, "expected": cs.expected, "verdict": v, "detail": d} for cs, v, d in results], f,
                      indent=1)
    return 1 if c["silent-wrong"] or c["crash"] else 0


if __name__ == "__main__":
    sys.exit(main())
