"""Knowledge distillation loss (Hinton, Vinyals, Dean 2015), as used by StrassenNets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    lam: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``(1 - lam) * CE(student, y) + lam * T^2 * CE(softmax(teacher/T), softmax(student/T))``.

    Args:
        student_logits: (B, C) (or (B, C, ...) as F.cross_entropy accepts).
        targets: (B,) class indices (or (B, ...)); rows with ``ignore_index=-100`` are ignored in the
            hard term.
        teacher_logits: same shape as ``student_logits``; detached (no gradient to any teacher).
        lam: weight of the soft term, in [0, 1].
        temperature: T > 0; the soft term is multiplied by T^2 so its gradient scale does not
            depend on T.
    Returns:
        a scalar: mean over the batch (and positions).
    """
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )
    hard = F.cross_entropy(student_logits, targets)
    T = float(temperature)
    teacher = F.softmax(teacher_logits.detach().to(student_logits.dtype) / T, dim=1)
    log_student = F.log_softmax(student_logits / T, dim=1)
    soft = -(teacher * log_student).sum(dim=1).mean() * (T * T)
    return (1.0 - lam) * hard + lam * soft
