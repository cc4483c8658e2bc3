"""Fault injection for the crash tests (not API): ``STRASSENKIT_FAULT="kind:step,..."``.

The training loop and the checkpoint writer ask :func:`fault_requested` at the points where a crash
is worst (after a step, in the middle of writing a checkpoint); the tests set the variable and kill
the process there to check that resume is bit-identical.
"""

from __future__ import annotations

import os


def fault_requested(kind: str, step: int) -> bool:
    """True when ``$STRASSENKIT_FAULT`` asks to inject fault ``kind`` at ``step``."""
    spec = os.environ.get("STRASSENKIT_FAULT", "")
    for item in spec.split(","):
        k, _, s = item.partition(":")
        if k == kind and s.strip().isdigit() and int(s) == step:
            return True
    return False
