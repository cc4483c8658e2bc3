"""The Triton kernels (tile gather + encode, decode + scatter, encoder/decoder gradients) on the CPU.

The kernels run in Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` has to be set before
Triton is imported; see ``triton_interp_checks.py``), each result against the float64 pure-PyTorch
reference, with guard regions around the outputs (the interpreter does not catch out-of-bounds
stores). The dispatch tests run in this process. Without Triton the interpreter tests are skipped.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from strassenkit.functional import ops, triton_stl

HAVE_TRITON = importlib.util.find_spec("triton") is not None
SCRIPT = Path(__file__).with_name("triton_interp_checks.py")

KERNEL_CHECKS = [f"{k}/{case}/{dt}" for k in ("encode", "decode", "wgrad")
                 for case in ("t4_r24", "t4_r49", "row1_r10", "fmt234_r7")
                 for dt in ("float32", "float16", "bfloat16")] + ["wgrad/grid_stride/float32"]
OP_CHECKS = ["op/444_r24/float32", "op/444_r24/float16", "op/144_r6/float32", "stlinear/exact_r49/float32"]


@pytest.fixture(scope="module")
def interp():
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (pip install triton==3.9.0): the Triton kernels are optional")
    env = dict(os.environ, TRITON_INTERPRET="1", STRASSENKIT_TRITON="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", KERNEL_CHECKS + OP_CHECKS)
def test_triton_matches_float64_reference_in_interpreter(interp, name):
    res = interp[name]
    assert res["calls"] >= 1, "the Triton kernels were not used"
    assert res["dtype_ok"], "output dtype differs from the input dtype"
    assert res["guard_ok"], "a kernel wrote outside its output"
    assert res["err"] <= res["tol"], res


def test_op_backward_uses_the_triton_kernels(interp):
    # forward: encode + decode; backward: encode of grad_y (+ decoder gradient), decode to grad_x,
    # encoder gradient: 6 launches through the Triton wrappers, none through the PyTorch helpers
    assert interp["op/444_r24/float32"]["calls"] == 6
    assert interp["active_backend"] == {"float32": "triton", "float64": "torch"}  # float64 stays on PyTorch


# ------------------------------------------------------------------ dispatch (this process, no kernels run)
@pytest.fixture
def triton_present(monkeypatch):
    monkeypatch.setattr(triton_stl, "available", lambda device_type="cuda": device_type == "cuda")


def test_cuda_tensors_dispatch_to_triton_when_it_is_available(triton_present, monkeypatch):
    monkeypatch.setattr(ops.native, "available", lambda: True)  # no native build needed for this test
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        assert ops.active_backend(dt, "cuda") == "triton"
    assert ops.active_backend(torch.float64, "cuda") == "torch"
    assert ops.active_backend(torch.float32, "cpu") == "native"  # CPU never takes Triton by default
    assert ops.active_backend(torch.bfloat16, "cpu") == "torch"
    with ops.backend("torch"):
        assert ops.active_backend(torch.bfloat16, "cuda") == "torch"  # the reference path stays selectable


def test_tracing_never_launches_kernels(triton_present):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fake = FakeTensor(FakeTensorMode(), torch.empty(2, 3, device="meta", dtype=torch.bfloat16), torch.device("cuda", 0))
    assert not ops._triton_for(fake)  # torch.compile / export trace the op's fake kernel; no launch
    assert not ops._triton_for(torch.empty(2, 3, device="meta"))


def test_without_triton_everything_falls_back_to_pytorch(monkeypatch):
    monkeypatch.setenv("STRASSENKIT_TRITON", "0")
    triton_stl._importable.cache_clear()
    try:
        assert not triton_stl.available("cuda")
        assert ops.active_backend(torch.bfloat16, "cuda") == "torch"
        with pytest.raises(RuntimeError, match="Triton"):
            with ops.backend("triton"):
                pass
    finally:
        monkeypatch.delenv("STRASSENKIT_TRITON")
        triton_stl._importable.cache_clear()


def test_importing_strassenkit_does_not_import_triton(interp):
    # the kernels are built on first use; a plain `import strassenkit` must not pay for importing Triton
    assert interp["import"] == {"triton_imported_by_strassenkit": False}
