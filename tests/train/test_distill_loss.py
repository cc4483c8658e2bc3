"""Distillation loss against a manual computation."""

import math

import pytest
import torch

from strassenkit.train.distill import distillation_loss


def _manual(s, y, t, lam, T):
    B, C = s.shape
    total = 0.0
    for i in range(B):
        ls = [s[i, j].item() for j in range(C)]
        lt = [t[i, j].item() for j in range(C)]
        lse = math.log(sum(math.exp(v) for v in ls))
        hard = -(ls[y[i]] - lse)
        zt = sum(math.exp(v / T) for v in lt)
        pt = [math.exp(v / T) / zt for v in lt]
        lse_T = math.log(sum(math.exp(v / T) for v in ls))
        soft = -sum(pt[j] * (ls[j] / T - lse_T) for j in range(C)) * T * T
        total += (1 - lam) * hard + lam * soft
    return total / B


@pytest.mark.parametrize("lam,T", [(0.0, 1.0), (0.5, 2.0), (0.9, 4.0), (1.0, 0.5)])
def test_matches_manual(lam, T):
    g = torch.Generator().manual_seed(int(lam * 10 + T))
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=g)
    assert abs(distillation_loss(s, y, t, lam, T).item() - _manual(s, y, t, lam, T)) < 1e-12


def test_gradient_only_to_student_and_errors():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    distillation_loss(s, torch.tensor([0, 1, 2]), t, 0.5, 2.0).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="lam"):
        distillation_loss(s, torch.tensor([0, 1, 2]), t, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, torch.tensor([0, 1, 2]), t, 0.5, 0.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(s, torch.tensor([0, 1, 2]), torch.randn(3, 5))
