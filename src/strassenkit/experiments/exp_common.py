"""Shared helpers for the paper-reproduction experiments (``strassenkit experiment NAME``).

Training loops with progress bars, accuracy, interleaved timing (ratios against a dense model measured in
the same run), mean/std summaries, and writing ``results/NAME/runs.json`` (one record per run, each with
its ``seed``) plus the meta block (config, torch version, threads, scale).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def mean_std(vals) -> tuple[float, float]:
    vals = [float(v) for v in vals]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_ms(vals, digits: int = 4) -> str:
    m, s = mean_std(vals)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def group_runs(records: list[dict], key: str = "model", dense_first: bool = False) -> dict[str, list[dict]]:
    """Records grouped by ``key`` in first-seen order; ``dense_first`` puts "dense", then other "dense*" rows first."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        out[r[key]].append(r)
    if dense_first:
        order = list(out)
        return dict(sorted(out.items(), key=lambda kv: (kv[0] != "dense", not kv[0].startswith("dense"), order.index(kv[0]))))
    return dict(out)


def finish(args, records: list[dict], meta: dict, plot: Callable, table: Callable, key=("seed", "model")) -> int:
    """Merge with earlier runs (``--append``), write runs.json, draw the plots, print the table."""
    if args.append:
        records, meta = merge_runs(args.out, records, meta, key=key)
    path = write_runs(args.out, records, meta)
    plot(records, Path(args.out))
    print(table(records))
    print(f"wrote {path}")
    return 0


def train_classifier(model, x, y, *, epochs: int, batch_size: int, lr: float, seed: int, desc: str,
                     weight_decay: float = 0.05, teacher=None, kd_loss: Callable | None = None,
                     augment: Callable | None = None, clip: float = 1.0,
                     on_step: Callable[[int, int], None] | None = None, pct_start: float = 0.15) -> float:
    """AdamW + one-cycle schedule; returns the wall-clock training seconds.

    ``teacher``/``kd_loss``: if given, the loss is ``kd_loss(student_logits, teacher_logits, labels)``.
    ``on_step(step, total_steps)`` is called before every step (e.g. to switch training phases).
    """
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
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
def forward_times(models: dict, x, repeats: int = 9, warmup: int = 2) -> dict:
    """Median forward seconds per model on ``x``, models interleaved so all see the same machine load."""
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


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_runs(out_dir: str | Path, records: list[dict], meta: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in records:
        if "seed" not in r:
            raise ValueError(f"every record needs its 'seed': {r}")
    import sys

    argv = sys.argv[1:] if sys.argv and "pytest" not in sys.argv[0] else []
    meta = {"command": "strassenkit " + " ".join(argv) if argv else None, **meta,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "written_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    path = out / "runs.json"
    path.write_text(json.dumps({"meta": meta, "runs": records}, indent=1, default=float))
    return path


def read_runs(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "runs.json").read_text())


def config_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def merge_runs(out_dir: str | Path, records: list[dict], meta: dict, key=("seed", "model")) -> tuple[list[dict], dict]:
    """Merge new ``records`` into ``out_dir/runs.json`` (same ``key`` values are replaced by the new record).

    The meta block keeps the old config under ``previous_configs`` so the report can show every command.
    """
    path = Path(out_dir) / "runs.json"
    if not path.is_file():
        return records, meta
    old = json.loads(path.read_text())
    new_keys = {tuple(r[k] for k in key) for r in records}
    kept = [r for r in old["runs"] if tuple(r.get(k) for k in key) not in new_keys]
    prev = old["meta"].get("previous_configs", []) + [old["meta"].get("config")]
    return kept + records, {**meta, "previous_configs": prev, "previous_scale": old["meta"].get("scale")}


# ---------------------------------------------------------------- StrassenNets accounting
def _spn_fallback_cost(module, inputs, output) -> dict:
    """Mults/adds of one SPN layer in its ternary form when strassenkit.cost has no SPN counter yet.

    Multiplications: the r products (a_hat scaling) per output patch / row; additions: ternary W_b and W_c
    applied as additions only (cost.matrix_op_cost on the ternary values), plus the bias.
    """
    from .. import cost
    from ..nn.spn import SPNConv2d, SPNLinear

    vb, _ = module.ternary_parts("w_b")
    vc, _ = module.ternary_parts("w_c")
    if isinstance(module, SPNLinear):
        apps = inputs[0].numel() // module.in_features
        mb, ab = cost.matrix_op_cost(vb.float(), apps)
        mc, ac = cost.matrix_op_cost(vc.float(), apps)
        mults = module.rank * apps + mb + mc
        adds = ab + ac + (apps * module.out_features if module.bias is not None else 0)
        dense = apps * module.in_features * module.out_features
    elif isinstance(module, SPNConv2d):
        x = inputs[0]
        B = x.shape[0]
        oh, ow = output.shape[-2:]
        qh, qw = module.out_patch
        patches = B * -(-oh // qh) * -(-ow // qw)
        g = module.groups
        mb, ab = cost.matrix_op_cost(vb.reshape(module.rank, -1).float(), patches)  # (r, C_in/g * window)
        wc = vc.reshape(g, module.rank // g, -1).transpose(1, 2)  # (g, C_out/g*p*p, r/g)
        mc, ac = 0, 0
        for gi in range(g):
            m_, a_ = cost.matrix_op_cost(wc[gi].float(), patches)
            mc, ac = mc + m_, ac + a_
        mults = module.rank * patches + mb + mc
        adds = ab + ac + (output.numel() if module.bias is not None else 0)
        kh, kw = module.kernel_size
        dense = output.numel() * (module.in_channels // g) * kh * kw
    else:  # pragma: no cover
        raise TypeError(type(module).__name__)
    return {"mults": mults, "adds": adds, "dense_macs": dense}


def model_bits(model) -> int:
    """Storage bits: 2 bits per ternary matrix entry of SPN layers (in ternary phases), 32 bits otherwise."""
    from ..nn.spn import SPNModule

    bits = 0
    ternary_ids = set()
    for m in model.modules():
        if isinstance(m, SPNModule):
            for name in m.ternary_names():
                if m.is_quantized(name):
                    p = getattr(m, name)
                    ternary_ids.add(id(p))
                    bits += 2 * p.numel() + 32  # values + one scale
    for p in model.parameters():
        if id(p) not in ternary_ids:
            bits += 32 * p.numel()
    for name, b in model.named_buffers():
        if "running_" in name:
            bits += 32 * b.numel()
    return bits


def arithmetic_costs(model, x, exclude: tuple[str, ...] = ()) -> dict:
    """Per-forward mults/adds of the counted layers, split into conv layers and all layers.

    Layer names starting with a prefix in ``exclude`` are left out of the "conv" totals (but kept in "all").
    SPN layers use strassenkit.cost's counter when one is registered, else :func:`_spn_fallback_cost`.
    """
    from .. import cost
    from ..nn.spn import SPNModule

    spn_rows = {}
    handles = []
    has_counter = cost._counter_for(next((m for m in model.modules() if isinstance(m, SPNModule)), None)) \
        if any(isinstance(m, SPNModule) for m in model.modules()) else True
    if not has_counter:
        for name, m in model.named_modules():
            if isinstance(m, SPNModule):
                handles.append(m.register_forward_hook(
                    lambda mod, i, o, name=name: spn_rows.__setitem__(name, (mod, _spn_fallback_cost(mod, i, o)))))
    try:
        rep = cost.count(model, x)
    finally:
        for h in handles:
            h.remove()
    out = {"conv_mults": 0, "conv_adds": 0, "conv_dense_macs": 0, "mults": 0, "adds": 0,
           "counter": "strassenkit.cost" if has_counter else "experiment fallback (no SPN counter in cost.py)"}
    from ..nn.spn import SPNConv2d

    modules = dict(model.named_modules())
    rows = [(r.name, r.mults, r.adds, r.dense_macs) for r in rep.layers]
    rows += [(name, c["mults"], c["adds"], c["dense_macs"]) for name, (mod, c) in spn_rows.items()]
    for name, mults, adds, dense in rows:
        out["mults"] += mults
        out["adds"] += adds
        is_conv = isinstance(modules.get(name), (torch.nn.Conv2d, SPNConv2d))
        if is_conv and not any(name.startswith(e) for e in exclude):
            out["conv_mults"] += mults
            out["conv_adds"] += adds
            out["conv_dense_macs"] += dense
    return out
