"""Test-suite settings: one intra-op thread (the suite is many small ops; 2 threads is slower here)."""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("STRASSENKIT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "strassenkit-tests"))
