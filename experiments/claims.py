"""Claim verdicts of the issue-#18 budgets (vit/full, spn_cnn/full, wordlm), computed from the run records.

Each check returns markdown lines: one ``verdict_line`` per claim ("confirmed / refuted / inconclusive at this
scale", with the numbers; "pending" while records are missing) and a line listing the runs still missing
against the budget's expected grid (from the recorded config, else the preset's defaults). Rules (see
``common.verdict_line``): "matches" = the mean gap is above -margin; "beats" = the gain exceeds 2 standard
errors; refuted when the 2-standard-error bound excludes the claim.
"""

from __future__ import annotations

import argparse

from . import spn_cnn, vit, wordlm
from .common import PENDING, apply_budget, available_inits, group_runs, mean_std, verdict_line

__all__ = ["check_vit_full", "check_spn_cnn_full", "check_wordlm", "expected_args", "expected_runs"]

SEEDS_NEEDED = 3


def expected_args(module, config: dict | None) -> argparse.Namespace:
    """The resolved options of the recorded config (or of the module's default budget when there is none)."""
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    args = p.parse_args([])
    if config:
        for k, v in config.items():
            # not the last call's subset: its seeds (often one; every claim needs the preset's three) and its
            # spn_cnn --kd (a call trains with or without distillation; the grid has both)
            if k not in ("seeds", "kd"):
                setattr(args, k, v)
        args.quick = False
    args.only = None
    apply_budget(args, module.PRESETS)
    return args


def expected_runs(name: str, runs: list[dict], config: dict | None) -> tuple[list[int], list[tuple[str, bool | None]]]:
    """(seeds, [(model kind, kd)]) that the issue-#18 budget of experiment ``name`` (vit, spn_cnn, wordlm) expects:
    the grid of the recorded config (else the preset's), seeds 0..2. ``kd`` is None except for spn_cnn. A vit
    parameter-matched dense is named by its recorded width (``dense@dim=120``), else ``dense@dim=matched``."""
    if name == "vit":
        args = expected_args(vit, config)
        dims = sorted({r["model"].split("=")[1] for r in runs if r["model"].startswith("dense@dim=")})
        args.dense_dims = dims or list(args.dense_dims)
        return list(args.seeds), [(k, None) for k in vit.model_kinds(args, args.inits or available_inits())]
    if name == "spn_cnn":
        args = expected_args(spn_cnn, config)
        return list(args.seeds), spn_cnn.model_kinds(args)
    if name == "wordlm":
        args = expected_args(wordlm, config)
        return list(args.seeds), [(k, None) for k in wordlm.model_kinds(args)]
    raise ValueError(f"no issue-#18 budget for experiment {name!r} (vit, spn_cnn, wordlm)")


def _missing(groups: dict, expected: list[str], seeds) -> list[str]:
    miss = []
    for k in expected:
        have = {r["seed"] for r in groups.get(k, [])}
        lack = [s for s in seeds if s not in have]
        if lack:
            miss.append(f"{k} (seeds {lack})")
    return [f"- **{PENDING}**: runs still missing: {', '.join(miss)}."] if miss else ["- every expected run is recorded."]


def _best(groups: dict, kinds: list[str], key: str, higher: bool = True) -> str | None:
    """The kind with the best mean ``key`` among ``kinds`` that have >= 2 seeds (None if none)."""
    cands = [(mean_std([r[key] for r in groups[k]])[0], k) for k in kinds if len(groups.get(k, [])) >= 2]
    if not cands:
        return None
    return (max if higher else min)(cands)[1]


def _vals(groups, k, key):
    return [r[key] for r in groups.get(k, [])] if k else []


def _overall(claim: str, verdicts: list[str]) -> str:
    if "confirmed" in verdicts:
        v = "confirmed"
    elif verdicts and all(x == "refuted" for x in verdicts):
        v = "refuted"
    elif PENDING in verdicts or not verdicts:
        v = PENDING
    else:
        v = "inconclusive"
    return f"- **overall: {v}{'' if v == PENDING else ' at this scale'}**: {claim}."


# ---------------------------------------------------------------- vit
def check_vit_full(runs: list[dict], config: dict | None) -> list[str]:
    args = expected_args(vit, config)
    g = group_runs(runs)
    inits = args.inits or available_inits()
    seeds, expected = expected_runs("vit", runs, config)
    out = _missing(g, [k for k, _ in expected], seeds)
    acc = "test_accuracy"
    dense_kinds = ["dense"] + [k for k in g if k.startswith("dense@lr=")]
    best_dense = _best(g, dense_kinds, acc)
    if best_dense:
        lrs = sorted((r["lr"], k) for k in dense_kinds if k in g for r in g[k][:1])
        edge = best_dense in (lrs[0][1], lrs[-1][1]) and len(lrs) >= 3
        out.append(f"- best-tuned dense: {best_dense} ({mean_std(_vals(g, best_dense, acc))[0]:.4f}) of "
                   f"{len(lrs)} learning rates" + (" (at the edge of the grid: tuning may be incomplete)." if edge else "."))

    def best_stl(init):  # among the learning-rate settings (the @rows= control is another model, not a setting)
        ks = [k for k in g if k == f"stl-{init}" or (k.startswith(f"stl-{init}@") and "@rows=" not in k)]
        return _best(g, ks, acc) or (f"stl-{init}" if f"stl-{init}" in g else None)

    rnd = best_stl("random")
    v, line = verdict_line(f"STL random init (best setting {rnd}) matches or beats the best-tuned dense ({best_dense}) "
                           "at ~2.7x fewer core MACs", _vals(g, rnd, acc), _vals(g, best_dense, acc),
                           kind="at_least", margin=0.005)
    out.append(line)
    matched = next((k for k in g if k.startswith("dense@dim=")), None)
    out.append(verdict_line(f"STL random init ({rnd}) matches or beats the parameter-matched dense ({matched})",
                            _vals(g, rnd, acc), _vals(g, matched, acc), kind="at_least", margin=0.005)[1])
    out.append(verdict_line(f"STL random init ({rnd}) beats the FLOP-matched low rank", _vals(g, rnd, acc),
                            _vals(g, "lowrank", acc), kind="better", margin=0.005)[1])
    rows1 = "stl-random@rows=1"
    out.append(verdict_line(f"row-mixing control: STL that never mixes tokens ({rows1}: 1 x 4 strips, rank 6, the same "
                            f"core MACs, 1/4 of the encode/decode MACs and of w_hat) matches or beats the best-tuned "
                            f"dense ({best_dense})",
                            _vals(g, rows1, acc), _vals(g, best_dense, acc), kind="at_least", margin=0.005)[1])
    out.append(verdict_line(f"row-mixing control: {rows1} matches STL random with 4-row tiles ({rnd}); if refuted, "
                            "STL's gain needs the mixing of the 4 tokens of a tile", _vals(g, rows1, acc),
                            _vals(g, rnd, acc), kind="at_least", margin=0.005)[1])
    checked = [k for k in g if k.startswith("stl-") and "@" in k and "@rows=" not in k]
    if checked:
        rows = ", ".join(f"{k} {mean_std(_vals(g, k, acc))[0]:.4f}" for k in sorted(checked))
        out.append(f"- STL learning-rate check ({rows}); each init below is compared at its best setting.")
    verdicts = []
    for init in inits:
        if init == "random":
            continue
        b = best_stl(init)
        v, line = verdict_line(f"theory-backed init {init} (best setting {b}) beats random ({rnd})",
                               _vals(g, b, acc), _vals(g, rnd, acc), kind="better", margin=0.005)
        out.append(line)
        # the best of several settings is biased upwards (random has more settings than most inits): the same
        # comparison at the one setting every init has; an init's verdict counts only where both agree
        if b != f"stl-{init}" or rnd != "stl-random":
            v2, line2 = verdict_line(f"theory-backed init {init} beats random at the same (base) setting "
                                     f"(stl-{init} vs stl-random)", _vals(g, f"stl-{init}", acc),
                                     _vals(g, "stl-random", acc), kind="better", margin=0.005)
            out.append(line2)
            v = v if v == v2 else (PENDING if PENDING in (v, v2) else "inconclusive")
        verdicts.append(v)
    out.append(_overall("theory-backed initialization beats random (at least one family; an init counts as "
                        "confirmed or refuted only where its best-setting and same-setting comparisons agree)",
                        verdicts))
    return out


# ---------------------------------------------------------------- spn_cnn
def check_spn_cnn_full(runs: list[dict], config: dict | None) -> list[str]:
    args = expected_args(spn_cnn, config)
    g = {}
    for r in runs:
        g.setdefault(r["model"] + (" +KD" if r["kd"] else ""), []).append(r)
    seeds, kinds = expected_runs("spn_cnn", runs, config)
    out = _missing(g, [k + (" +KD" if kd else "") for k, kd in kinds], seeds)
    acc = "test_accuracy"
    wider = sorted((k for k in g if k.startswith("dense@width=")), key=lambda k: int(k.split("=")[1]))
    out.append(verdict_line(f"full precision at width {args.width} is within 2 points of the wider "
                            f"{wider[-1] if wider else 'dense@width=' + str(2 * args.width)} (wide enough)",
                            _vals(g, "dense", acc), _vals(g, wider[-1] if wider else None, acc),
                            kind="at_least", margin=0.02)[1])
    dense = g.get("dense", [])
    if dense:
        d_conv = dense[0]["conv_mults"]
        big = [k for k, rs in g.items() if not k.startswith("dense") and rs[0]["conv_mults"] <= 0.01 * d_conv]
    else:
        big = []
    b = _best(g, big, acc)
    fewer = f"{100 * (1 - g[b][0]['conv_mults'] / dense[0]['conv_mults']):.2f}% fewer" if b else ">= 99% fewer"
    out.append(verdict_line(f"over 99% fewer conv multiplications ({b or 'no such config recorded'}: {fewer}) at "
                            "small accuracy loss (<= 1 point vs full precision)", _vals(g, b, acc),
                            [r[acc] for r in dense], kind="at_least", margin=0.01)[1])
    if b:
        base = b.replace(" +KD", "")
        out.append(verdict_line(f"distillation improves {base}", _vals(g, base + " +KD", acc), _vals(g, base, acc),
                                kind="better", margin=0.002)[1])
    return out


# ---------------------------------------------------------------- wordlm
def check_wordlm(runs: list[dict], config: dict | None) -> list[str]:
    args = expected_args(wordlm, config)
    g = group_runs(runs)
    seeds, kinds = expected_runs("wordlm", runs, config)
    out = _missing(g, [k for k, _ in kinds], seeds)
    key = "val_perplexity"
    dense_kinds = ["dense"] + [k for k in g if k.startswith("dense@lr=")]
    best_dense = _best(g, dense_kinds, key, higher=False)
    ref = mean_std(_vals(g, best_dense, key))[0] if best_dense else float("nan")
    margin = 0.05 * ref if best_dense else 0.0
    verdicts = []
    for k in sorted((k for k in g if k.startswith("spn@")), key=lambda k: float(k[4:])):
        red = g["dense"][0]["mults_per_word"] / g[k][0]["mults_per_word"] if "dense" in g else float("nan")
        v, line = verdict_line(f"ternary {k} ({red:.0f}x fewer multiplications per word) comes within 5% of the "
                               f"best full-precision perplexity ({best_dense})", _vals(g, k, key),
                               _vals(g, best_dense, key), kind="at_least", margin=margin, higher_is_better=False,
                               digits=1)
        verdicts.append(v)
        out.append(line)
    out.append(_overall("ternary SPN language models come close to full precision (some r ratio)", verdicts))
    return out
