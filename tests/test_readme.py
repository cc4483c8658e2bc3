"""Every ```python block of README.md runs as written.

Blocks run in a fresh namespace each, in a temporary working directory. A block that uses a name the
README leaves to the reader (``model``, ``dense_model``, ``batches``, ``cnn``: "your model") gets the
explicit PRELUDE below first; any other name a block uses without defining it fails the test, so a new
README block cannot silently depend on something undefined.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)

# What "your model" means in the README's conversion example: a small transformer-style MLP stack with
# attention-like projections (so the "re:.*attn\..*" pattern matches), an fc2, an output head; a copy of
# it as the dense reference; a few batches of (batch, seq, features) inputs; and a small CNN.
PRELUDE = '''
import copy
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn.proj(torch.relu(self.attn.qkv(x)))
        return x + self.fc2(torch.relu(self.fc1(x)))


class Model(nn.Module):
    def __init__(self, d=32, classes=10):
        super().__init__()
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


torch.manual_seed(0)
model = Model()
dense_model = copy.deepcopy(model)
batches = [torch.randn(8, 16, 32) for _ in range(4)]
cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(10))
cnn(torch.randn(1, 3, 12, 12))
'''
PRELUDE_NAMES = {"model", "dense_model", "batches", "cnn"}


def _undefined(code: str) -> set[str]:
    """Names a block loads but never binds (assignments, imports, defs, loops, comprehensions)."""
    tree = ast.parse(code)
    bound, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else used).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
            if isinstance(node, ast.FunctionDef):
                bound |= {a.arg for a in node.args.args + node.args.kwonlyargs}
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return used - bound - set(dir(builtins))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2
    assert "sk.cost.count(" in BLOCKS[0]  # the first example (issue #13: it failed)


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_block_runs(i, tmp_path, monkeypatch):
    code = BLOCKS[i]
    missing = _undefined(code)
    unknown = missing - PRELUDE_NAMES
    assert not unknown, f"README block {i + 1} uses {sorted(unknown)} without defining them (add them to PRELUDE?)"
    if "transformers" in code:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": f"readme_block_{i + 1}"}
    if missing:
        exec(compile(PRELUDE, "test_readme.PRELUDE", "exec"), ns)
    exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)
