"""The plain training, accuracy and timing helpers of ``strassenkit demo`` (the experiments reuse them).

:func:`train_classifier` is AdamW with a one-cycle schedule over shuffled mini-batches (optionally with a
teacher for distillation and a per-step hook, e.g. to switch SPN phases); :func:`accuracy` evaluates in
batches; :func:`forward_times` and :func:`train_step_times` time several models interleaved so they all see
the same machine load.
For resumable training with checkpoints use :func:`strassenkit.train.train` instead.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["train_classifier", "accuracy", "forward_times", "train_step_times"]


def train_classifier(model, x, y, *, epochs: int, batch_size: int, lr: float, seed: int, desc: str,
                     weight_decay: float = 0.05, teacher=None, kd_loss: Callable | None = None,
                     augment: Callable | None = None, clip: float = 1.0,
                     on_step: Callable[[int, int], None] | None = None, pct_start: float = 0.15,
                     param_groups: list[dict] | None = None) -> float:
    """AdamW + one-cycle schedule; returns the wall-clock training seconds.

    ``teacher``/``kd_loss``: if given, the loss is ``kd_loss(student_logits, teacher_logits, labels)``.
    ``on_step(step, total_steps)`` is called before every step (e.g. to switch training phases).
    ``param_groups``: optional ``[{"params": [...], "lr_scale": float}, ...]`` covering the parameters to
    train; each group's peak learning rate is ``lr * lr_scale`` (default: one group, every parameter).
    """
    g = torch.Generator().manual_seed(seed)
    groups = param_groups if param_groups is not None else [{"params": list(model.parameters())}]
    groups = [{"params": [p for p in grp["params"] if p.requires_grad], "lr": lr * float(grp.get("lr_scale", 1.0))}
              for grp in groups]
    groups = [grp for grp in groups if grp["params"]]
    params = [p for grp in groups for p in grp["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[grp["lr"] for grp in groups], total_steps=steps,
                                                pct_start=pct_start)
    model.train()
    if teacher is not None:
        teacher.eval()
    bar = tqdm(total=steps, desc=desc, leave=False, unit="step", mininterval=2.0)
    t0 = time.perf_counter()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i: i + batch_size]
            xb, yb = x[idx], y[idx]
            if on_step is not None:
                on_step(step, steps)
            step += 1
            if augment is not None:
                xb = augment(xb, g)
            out = model(xb)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(xb)
                loss = kd_loss(out, t_out, yb)
            else:
                loss = F.cross_entropy(out, yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss {loss.item()}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            bar.update()
            if bar.n % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(model, x, y, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i: i + batch_size]).argmax(-1) == y[i: i + batch_size]).sum().item()
    return correct / len(x)


@torch.no_grad()
def forward_times(models: dict, x, repeats: int = 9, warmup: int = 2, inference: bool = False) -> dict:
    """Median forward seconds per model on ``x``, models interleaved so all see the same machine load.

    ``inference=True`` times the forward under ``torch.no_grad()`` (what inference runs); the default
    times it with autograd recording, as inside a training step."""
    ctx = torch.no_grad if inference else contextlib.nullcontext
    with ctx():
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                m(x)
        samples = {k: [] for k in models}
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def train_step_times(models: dict, x, y, batch_size: int, repeats: int = 15, warmup: int = 3, lr: float = 1e-3) -> dict:
    """Median seconds of one training step (forward, cross-entropy, backward, AdamW step) per model.

    Every model trains a copy of itself (the models passed in are not changed) on the same batches of
    ``x``/``y``, steps interleaved across models so that all see the same machine load."""
    import copy

    copies = {k: copy.deepcopy(m).train() for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr) for k, m in copies.items()}
    samples = {k: [] for k in copies}
    n_batches = max(1, len(x) // batch_size)
    for i in range(warmup + repeats):
        s = (i % n_batches) * batch_size
        xb, yb = x[s: s + batch_size], y[s: s + batch_size]
        for k, m in copies.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(xb), yb)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if i >= warmup:
                samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}
