"""Shared helpers of the paper experiments (the one module every experiment may import).

Training loops with progress bars, accuracy, interleaved timing (ratios against a dense model measured in
the same run), mean/std summaries, the init families an STL experiment compares, arithmetic costs and
model sizes, and writing ``results/NAME/runs.json`` (one record per run, each with its ``seed``) plus the
meta block (config, command, torch version, threads, scale).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from strassenkit import algorithms, cost
from strassenkit._models.training import accuracy, forward_times, train_classifier
from strassenkit.nn import SPNConv2d, SPNModule

__all__ = ["COMMAND", "mean_std", "fmt_ms", "group_runs", "finish", "train_classifier", "accuracy", "forward_times",
           "n_params", "write_runs", "read_runs", "config_of", "merge_runs", "store_runs", "runs_lock", "available_inits", "model_bits",
           "arithmetic_costs", "add_budget_argument", "apply_budget", "budget_defaults", "compare", "verdict_line",
           "PENDING", "estimate_step_seconds", "fmt_minutes", "save_progress"]

#: the command line that launched the experiment (set by ``run.main``; written into runs.json's meta)
COMMAND: str | None = None


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
    records, path = store_runs(args, records, meta, key=key)
    plot(records, Path(args.out))
    print(table(records))
    print(f"wrote {path}")
    return 0


def save_progress(args, records: list[dict], meta: dict, key=("seed", "model")) -> Path:
    """Write the runs finished so far (merged as ``finish`` does with --append), so a killed call keeps them."""
    return store_runs(args, records, {**meta, "in_progress": True}, key=key)[1]


@contextlib.contextmanager
def runs_lock(out_dir: str | Path):
    """An exclusive lock on ``out_dir/runs.json`` (two experiment calls with ``--append`` may run at once)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".runs.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def store_runs(args, records: list[dict], meta: dict, key=("seed", "model")) -> tuple[list[dict], Path]:
    """Under the lock: merge into the current runs.json when ``args.append`` (re-read now, so records another
    call wrote meanwhile are kept), then write. Returns all records written and the path."""
    with runs_lock(args.out):
        if args.append:
            records, meta = merge_runs(args.out, records, meta, key=key)
        return records, write_runs(args.out, records, meta)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_runs(out_dir: str | Path, records: list[dict], meta: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in records:
        if "seed" not in r:
            raise ValueError(f"every record needs its 'seed': {r}")
    meta = {"command": COMMAND, **meta,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "written_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    path = out / "runs.json"
    tmp = path.with_suffix(".json.tmp")  # written whole, then renamed: a killed call never leaves half a file
    tmp.write_text(json.dumps({"meta": meta, "runs": records}, indent=1, default=float))
    os.replace(tmp, path)
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
    prev = old["meta"].get("previous_configs", [])
    if old["meta"].get("config") != meta.get("config"):  # a progress write of this same call adds no history
        prev = prev + [old["meta"].get("config")]
    carried = {k: v for k, v in old["meta"].items() if k.startswith("legacy")}  # history of earlier pipelines
    return kept + records, {**carried, **meta, "previous_configs": prev, "previous_scale": old["meta"].get("scale")}


def available_inits() -> list[str]:
    """The STL init families to compare: ``random`` (the baseline) first, then every other registered family."""
    return ["random"] + [f for f in algorithms.families() if f != "random"]


# ---------------------------------------------------------------- StrassenNets accounting
def model_bits(model) -> int:
    """Storage bits: 2 bits per ternary matrix entry of SPN layers (in ternary phases), 32 bits otherwise."""
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
    """Per-forward mults/adds of the layers strassenkit.cost counts, split into conv layers and all layers.

    Layer names starting with a prefix in ``exclude`` are left out of the "conv" totals (but kept in "all").
    """
    rep = cost.count(model, x)
    out = {"conv_mults": 0, "conv_adds": 0, "conv_dense_macs": 0, "mults": 0, "adds": 0, "counter": "strassenkit.cost"}
    modules = dict(model.named_modules())
    for r in rep.layers:
        out["mults"] += r.mults
        out["adds"] += r.adds
        is_conv = isinstance(modules.get(r.name), (torch.nn.Conv2d, SPNConv2d))
        if is_conv and not any(r.name.startswith(e) for e in exclude):
            out["conv_mults"] += r.mults
            out["conv_adds"] += r.adds
            out["conv_dense_macs"] += r.dense_macs
    return out


# ---------------------------------------------------------------- budgets (named presets of options)
def add_budget_argument(p, presets: dict[str, dict], default: str) -> None:
    """``--budget NAME``: fills every option left at None from ``presets[NAME]`` (explicit options win)."""
    lines = "; ".join(f"{k}: " + ", ".join(f"{o}={v}" for o, v in sorted(d.items())) for k, d in presets.items())
    p.add_argument("--budget", choices=list(presets), default=default,
                   help=f"named preset of the options left unset (default {default}). {lines}")


def apply_budget(args, presets: dict[str, dict]) -> None:
    """Fill the options of ``args`` that are None from the preset ``args.budget`` (lists are copied)."""
    for k, v in presets[args.budget].items():
        if getattr(args, k, None) is None:
            setattr(args, k, list(v) if isinstance(v, (list, tuple)) else v)


def budget_defaults(presets: dict[str, dict], config: dict, legacy: str = "small") -> dict:
    """The preset values a recorded ``config`` was built from (configs written before presets: ``legacy``)."""
    return dict(presets.get(config.get("budget") or legacy, {}))


# ---------------------------------------------------------------- claim verdicts from the records
PENDING = "pending"


def compare(a, b) -> tuple[float, float, int, int]:
    """(mean(a) - mean(b), standard error of that difference, len(a), len(b)); se is nan with < 2 values on a side."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if not a or not b:
        return float("nan"), float("nan"), len(a), len(b)
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    se = (sa ** 2 / len(a) + sb ** 2 / len(b)) ** 0.5 if len(a) > 1 and len(b) > 1 else float("nan")
    return ma - mb, se, len(a), len(b)


def verdict_line(claim: str, a, b, *, kind: str, margin: float, higher_is_better: bool = True,
                 unit: str = "", digits: int = 4, min_seeds: int = 2) -> tuple[str, str]:
    """One-line verdict of ``claim`` comparing the values ``a`` (the claim's subject) with ``b`` (the reference).

    ``kind="at_least"``: "a matches or beats b": confirmed if the mean gap a - b is above -margin; refuted if even
    a - b + 2 se is below -margin; inconclusive otherwise. ``kind="better"``: "a beats b": confirmed if
    a - b - 2 se > 0; refuted if a - b + 2 se < margin (no gain of at least ``margin`` is plausible); inconclusive
    otherwise. ``higher_is_better=False`` (perplexity, bits/char) flips the sign. Fewer than ``min_seeds`` records
    on a side give "pending". Returns (verdict, line).
    """
    sign = 1.0 if higher_is_better else -1.0
    d, se, na, nb = compare([sign * v for v in a], [sign * v for v in b])
    if na < min_seeds or nb < min_seeds:
        return PENDING, (f"- **{PENDING}**: {claim} (records: {na} vs {nb} seeds; needs >= {min_seeds} each).")
    if kind == "at_least":
        verdict = "confirmed" if d >= -margin else ("refuted" if d + 2 * se < -margin else "inconclusive")
    elif kind == "better":
        verdict = "confirmed" if d - 2 * se > 0 else ("refuted" if d + 2 * se < margin else "inconclusive")
    else:
        raise ValueError(f"kind must be 'at_least' or 'better', got {kind!r}")
    ma, mb = mean_std(a)[0], mean_std(b)[0]
    return verdict, (f"- **{verdict} at this scale**: {claim}: {ma:.{digits}f} vs {mb:.{digits}f}{unit} "
                     f"(difference {sign * d:+.{digits}f}, 2 se {2 * se:.{digits}f}, margin {margin:g}; "
                     f"{na} vs {nb} seeds).")


# ---------------------------------------------------------------- wall-time estimates
def estimate_step_seconds(step: Callable[[], None], steps: int, warmup: int = 3) -> float:
    """Median-free estimate: mean seconds of ``steps`` calls of ``step()`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / max(1, steps)


def log_x(ax) -> None:
    """A log-scale x axis with labels on the decades only (minor labels such as 2x10^5, 3x10^5 overlap)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())


def fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
