"""Tests of the top-level experiments/ folder (not shipped in the wheel): make it importable as ``experiments``."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
