"""strassenkit.runtime: keeping freed memory in the process (glibc mallopt)."""

import resource
import sys

import pytest
import torch

from strassenkit import runtime

glibc_only = pytest.mark.skipif(runtime._libc() is None or not sys.platform.startswith("linux"),
                                reason="needs glibc's mallopt")


def _faults_of_fresh_tensors(n=4, mib=48):
    """Minor page faults while allocating, touching and freeing n tensors of `mib` MiB one after another."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.empty(mib * 2**18)  # float32: mib MiB, above glibc's largest dynamic mmap threshold (32 MiB)
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_retained_memory_is_reused_without_page_faults():
    try:
        assert runtime.retain_freed_memory() and runtime.freed_memory_retained()
        for _ in range(3):  # the heap grows until the pattern fits (small allocations may split a freed block)
            _faults_of_fresh_tensors()
        retained = _faults_of_fresh_tensors()
        assert runtime.retain_freed_memory(False) and not runtime.freed_memory_retained()
        fresh = _faults_of_fresh_tensors()
    finally:
        runtime.retain_freed_memory(False)
    # default glibc: every 48 MiB tensor is a fresh mmap, faulted in again (>= 24 faults even with 2 MiB
    # huge pages); retained: the same heap memory comes back, already mapped
    assert fresh >= 4 * 24, fresh
    assert retained < fresh / 4, (retained, fresh)


@glibc_only
def test_results_do_not_depend_on_the_allocator_setting():
    x, w = torch.randn(64, 48, dtype=torch.float64), torch.randn(48, 32, dtype=torch.float64)
    try:
        runtime.retain_freed_memory()
        a = x @ w
    finally:
        runtime.retain_freed_memory(False)
    assert torch.equal(a, x @ w)


def test_without_glibc_warns_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(runtime, "_libc", lambda: None)
    with pytest.warns(RuntimeWarning, match="mallopt"):
        assert runtime.retain_freed_memory() is False
    assert not runtime.freed_memory_retained()
