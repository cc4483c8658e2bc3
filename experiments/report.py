"""``python experiments/run.py report``: gather results/*/runs.json into results/REPORT.md.

Every table is rebuilt from the per-run records (mean ± standard deviation over seeds), every plot is
linked, and each section states the scale that was run and the exact command that produced it. The
claim checks are computed from the records, never written by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import charlm, claims, minilm, spn_cnn, vit, wordlm
from .common import budget_defaults, group_runs, mean_std

COMMAND = "python experiments/run.py"
MODULES = {"vit": vit, "spn_cnn": spn_cnn, "charlm": charlm, "wordlm": wordlm, "minilm": minilm}

# (experiment, folder under results/, title, claim); the issue-#18 budgets (folders vit/full, spn_cnn/full,
# wordlm) come first in their topic, the earlier small-budget runs stay as the second table
SECTIONS = [
    ("vit", "vit/full", "1. STL vision transformer at the converged budget (issue #18: full Fashion-MNIST, 10 epochs, "
     "4 blocks)", "STL at ~2.7x fewer linear-layer core FLOPs matches or beats dense accuracy, and theory-backed "
     "initialization beats random."),
    ("vit", "vit", "1b. STL vision transformer, earlier small budget (STL paper, T2T-ViT-7 on ImageNet → small ViT "
     "on Fashion-MNIST)", "STL at ~2.7x fewer linear-layer core FLOPs matches or beats dense accuracy, and "
     "theory-backed initialization beats random."),
    ("spn_cnn", "spn_cnn/full", "2. StrassenNets CNN at the converged budget (issue #18: full Fashion-MNIST, 10 "
     "epochs, p x g x r sweep)", "over 99% fewer multiplications in the convolutions at small accuracy loss."),
    ("spn_cnn", "spn_cnn", "2b. StrassenNets CNN, earlier small budget (ResNet on ImageNet/CIFAR → small ResNet on "
     "Fashion-MNIST)", "over 99% fewer multiplications in the convolutions at small accuracy loss."),
    ("wordlm", "wordlm", "3. StrassenNets character-aware word-level language model (Kim et al. 2016 on PTB → "
     "Shakespeare, held-out works)", "ternary SPN language models come close to the full-precision perplexity "
     "with far fewer multiplications."),
    ("charlm", "charlm", "3b. StrassenNets character-level language model (PTB → Shakespeare, held-out works)",
     "ternary SPN language models come close to the full-precision bits per character."),
    ("minilm", "minilm", "4. Pretrained transformer conversion (TinyLlama → all-MiniLM-L6-v2)",
     "STL gives quality comparable to 2:4 structured sparsity at a larger FLOP reduction (2.2x vs 1.7x)."),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", help="folder holding vit/, spn_cnn/, charlm/, wordlm/, minilm/")
    p.add_argument("--out", default=None, help="report path (default RESULTS/REPORT.md)")


def command_from_config(name: str, config: dict) -> str:
    """The ``python experiments/run.py NAME ...`` command line that reproduces ``config`` (non-default options only)."""
    module = MODULES[name]
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    defaults = {a.dest: a.default for a in parser._actions}
    presets = getattr(module, "PRESETS", None)
    if presets:  # options filled from a --budget preset; configs written before presets were the "small" budget
        config = {"budget": "small", **config}
        defaults.update(budget_defaults(presets, config))
    parts = [f"{COMMAND} {name}"]
    for action in parser._actions:
        key = action.dest
        if key == "help" or key not in config or config[key] == defaults.get(key):
            continue
        flag = action.option_strings[0]
        val = config[key]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            parts.append(flag)
        elif isinstance(val, list):
            parts.append(flag + " " + " ".join(str(v) for v in val))
        elif val is not None:
            parts.append(f"{flag} {val}")
    return " ".join(parts)


def _commands(name: str, meta: dict) -> list[str]:
    configs = [c for c in meta.get("previous_configs", []) + [meta.get("config")] if c]
    return [command_from_config(name, c) for c in configs]


def check_vit(runs) -> list[str]:
    g = group_runs(runs)
    if "dense" not in g:
        return []
    d = mean_std([r["test_accuracy"] for r in g["dense"]])
    dm = g["dense"][0]["linear_macs_per_image"]
    out = [f"- dense: test accuracy {d[0]:.4f} ± {d[1]:.4f}."]
    for k, rs in g.items():
        if k.startswith("dense@"):
            m = mean_std([r["test_accuracy"] for r in rs])
            out.append(f"- dense tuning check {k}: {m[0]:.4f} ± {m[1]:.4f}.")
            if m[0] > d[0]:
                d = m
    if any(k.startswith("dense@") for k in g):
        out.append(f"- comparisons below use the best dense baseline ({d[0]:.4f}).")
    stl = {k: v for k, v in g.items() if k.startswith("stl-")}
    for k, rs in stl.items():
        m = mean_std([r["test_accuracy"] for r in rs])
        red = dm / rs[0]["linear_macs_per_image"]
        core = dm / rs[0]["linear_macs_core_per_image"]
        verdict = "matches or beats" if m[0] >= d[0] - d[1] else "is below"
        out.append(f"- {k}: {m[0]:.4f} ± {m[1]:.4f} ({m[0] - d[0]:+.4f} vs dense; {verdict} dense) at "
                   f"{core:.2f}x fewer core MACs but only {red:.2f}x fewer linear MACs once encode/decode are counted.")
    if "stl-random" in stl and len(stl) > 1:
        r, rs_ = mean_std([x["test_accuracy"] for x in stl["stl-random"]])
        for k, rs in stl.items():
            if k == "stl-random":
                continue
            m, sd = mean_std([x["test_accuracy"] for x in rs])
            comb = (sd ** 2 + rs_ ** 2) ** 0.5
            rel = "above" if m > r else "below"
            sig = "more" if abs(m - r) > comb else "less"
            out.append(f"- theory-backed init {k} vs random: {m - r:+.4f} ({rel} random; {sig} than one combined "
                       f"standard deviation, {comb:.4f}).")
    if "lowrank" in g:
        m = mean_std([r["test_accuracy"] for r in g["lowrank"]])
        out.append(f"- FLOP-matched low rank: {m[0]:.4f} ± {m[1]:.4f} at {dm / g['lowrank'][0]['linear_macs_per_image']:.2f}x "
                   f"fewer linear MACs.")
    return out


def check_spn_cnn(runs) -> list[str]:
    dense = [r for r in runs if r["model"] == "dense"]
    if not dense:
        return []
    d = mean_std([r["test_accuracy"] for r in dense])
    out = [f"- full precision: {d[0]:.4f} ± {d[1]:.4f}."]
    groups = {}
    for r in runs:
        if r["model"] != "dense":
            groups.setdefault((r["model"], r["kd"]), []).append(r)
    for (kind, kd), rs in groups.items():
        m = mean_std([r["test_accuracy"] for r in rs])
        fewer = 100 * (1 - rs[0]["conv_mults"] / dense[0]["conv_mults"])
        out.append(f"- {kind}{' +KD' if kd else ''}: {fewer:.1f}% fewer conv multiplications, accuracy "
                   f"{m[0]:.4f} ± {m[1]:.4f} ({m[0] - d[0]:+.4f} vs full precision).")
    counters = sorted({r.get("counter", "?") for r in runs})
    out.append(f"- multiplications/additions counted by: {', '.join(counters)}. The stem convolution (1 input channel) "
               f"and the head stay dense and full precision in every model and are excluded from the conv columns.")
    return out


def check_charlm(runs) -> list[str]:
    g = group_runs(runs)
    if "dense" not in g:
        return []
    d = mean_std([r["val_bits_per_char"] for r in g["dense"]])
    out = [f"- full precision: {d[0]:.3f} ± {d[1]:.3f} bits/char on held-out works."]
    for k, rs in g.items():
        if k.startswith("dense@"):
            m = mean_std([r["val_bits_per_char"] for r in rs])
            out.append(f"- full-precision tuning check {k}: {m[0]:.3f} ± {m[1]:.3f} bits/char.")
            if m[0] < d[0]:
                d = m
    if any(k.startswith("dense@") for k in g):
        out.append(f"- comparisons below use the best full-precision learning rate ({d[0]:.3f} bits/char).")
    for k, rs in g.items():
        if k.startswith("dense"):
            continue
        m = mean_std([r["val_bits_per_char"] for r in rs])
        out.append(f"- {k}: {m[0]:.3f} ± {m[1]:.3f} ({m[0] - d[0]:+.3f} bits/char) with "
                   f"{g['dense'][0]['mults_per_char'] / rs[0]['mults_per_char']:.0f}x fewer multiplications per character.")
    return out


def check_minilm(runs) -> list[str]:
    out = []
    for k, rs in group_runs(minilm.current(runs)).items():
        c = mean_std([r["cosine_mean"] for r in rs])
        s = mean_std([r["pair_spearman"] for r in rs])
        extra = ""
        errs = [r["calib_rel_error_mean"] for r in rs if r.get("calib_rel_error_mean") is not None]
        if errs:
            held = [r["calib_rel_error_heldout_mean"] for r in rs if r.get("calib_rel_error_heldout_mean") is not None]
            extra = (f" Mean per-layer relative error after calibration: {mean_std(errs)[0]:.3f}"
                     + (f" (held-out {mean_std(held)[0]:.3f})" if held else "") + ".")
        b = mean_std([r["before_distill"]["cosine_mean"] for r in rs])
        out.append(f"- {k}: {mean_std([r['flop_reduction'] for r in rs])[0]:.2f}x fewer linear FLOPs, cosine to teacher "
                   f"{c[0]:.4f} ± {c[1]:.4f} (before distillation {b[0]:.4f}), pair-similarity Spearman "
                   f"{s[0]:.4f} ± {s[1]:.4f}.{extra}")
    return out


CAVEATS = {
    "vit": [
        "STL layers hold w_hat of r/t^2 = 1.5x the dense weight's size, so the STL models have more parameters than "
        "dense (the low-rank baseline has fewer).",
        "At width 128 the encode/decode MACs are a large share of an STL layer (t^3 (1/K + 1/N) of the core), so the "
        "total linear-layer reduction is far below the core's t^3/r = 2.67x; the paper's widths (256+) and LLM widths "
        "shrink that overhead.",
        "The training budget is short (a few epochs on a subset): every model, the dense one included, is far from "
        "converged; learning rates were tuned only through the dense tuning rows shown (if any).",
        "Training/inference times are ratios measured in the same process, but on a shared, loaded 2-core machine, "
        "with the STL CPU path the library had at the time of the run; results/bench has dedicated speed measurements.",
        "dense@dim=160 is the parameter-matched dense baseline (about as many parameters as the STL models).",
    ],
    "spn_cnn": [
        "Width 8/16 channels, a 6000-image subset and 3 epochs: the full-precision model is small and undertrained, "
        "so 'accuracy loss' is measured against a weak reference.",
        "KD used lambda 0.5 and temperature 2 without tuning; it did not help in this regime.",
    ],
    "charlm": [
        "Very short training (see scale): the models are far from converged, so the comparison measures early "
        "training as much as capacity; SPN learning rates were not tuned, the full-precision one was (rows dense@lr).",
        "SPN layers have r = ratio x hidden products per character and layer; the multiplication count includes the "
        "recurrent layer at every step.",
    ],
    "minilm": [
        "Each seed calibrates on its own 2,000 sentences and distills in its own order; the headline rows have 3 "
        "seeds, the other rows are 1-seed explorations (no spread: compare them against the largest 3-seed std, "
        "~0.03 cosine).",
        "Tagged rows are the same method with another setting (`lr1e-3`: distillation lr 1e-3 instead of 1e-4; "
        "`alt2`: 2 alternating calibration rounds; `palt1`: the planner measures candidates after 1 alternating "
        "round instead of a w_hat-only fit; `ridgesel`: the ridge chosen per layer on held-out sentences). "
        "lr 1e-3 helped every method (2:4, low rank and STL alike), so the goal line compares each side at its best "
        "variant; the learning rate was chosen on the evaluation sentences (there is no separate validation set), "
        "which favours every method equally.",
        "Distillation (600 x 16 sentences) is on Shakespeare sentences, which are out of domain for MiniLM.",
        "The 2:4 FLOP reduction is the ideal 2x of a sparse kernel; STL's includes encode/decode at the evaluated "
        "sentence lengths (tiles pad each sentence to a multiple of 4 tokens).",
    ],
}

CHECKS = {"vit": check_vit, "spn_cnn": check_spn_cnn, "charlm": check_charlm, "minilm": check_minilm}
#: the issue-#18 folders: verdicts per claim from the records, pending while runs are missing
VERDICTS = {"vit/full": claims.check_vit_full, "spn_cnn/full": claims.check_spn_cnn_full, "wordlm": claims.check_wordlm}
CAVEATS["vit/full"] = [
    "Learning rates: dense over the grid shown; STL over the learning-rate check (peak lr and the codec enc_x/dec "
    "multiplier) for the families of --lr-check-inits only; the other families ran at the base lr, so the verdicts "
    "also compare every init with random at that same base setting (the best of several settings is biased "
    "upwards).",
    "STL layers hold w_hat of r/t^2 = 1.5x the dense weight's size; dense@dim=N is the parameter-matched dense.",
    "At width 96 encode/decode MACs are a large share of an STL layer, so the total linear-layer reduction is far "
    "below the core's t^3/r = 2.67x.",
    "Why STL beats dense here: the row-mixing control (stl-random@rows=1: the same core MACs, tiles of one token "
    "that never mix) only matches dense, while 4-row tiles gain about a point. An STL layer with 4-row tiles also "
    "mixes each token with the 3 neighbours of its tile (here 4 patches of one image row), a local token-mixing "
    "inductive bias that dense linear layers lack; the gain is not evidence that the bilinear FLOP reduction "
    "itself improves accuracy.",
    "Speed: 'inference time / dense' is measured in the same run against an untrained dense model (STL is slower "
    "at this width); 'train time / dense' divides wall times of separate runs on a shared machine (other runs, "
    "and pauses for benchmarks, overlapped some of them): it is not a speed measurement. Layer and model speed "
    "are in results/bench/.",
]
CAVEATS["spn_cnn/full"] = ["Width 16/32 with one residual block per stage; dense@width=32 checks whether wider helps.",
                           "KD used lambda 0.5 and temperature 2 without tuning."]
CAVEATS["wordlm"] = [
    "A 2 x 200 LSTM over 5000 words (Kim et al.'s small model has 2 x 300 over 10k PTB words) and 3 epochs: sized "
    "to 1 CPU thread; <unk> targets count in the perplexity (rate in the scale line).",
    "SPN ranks: r = ratio x c_out for the character convolutions and r = ratio x min(in, out) for the linear layers.",
]


def build_report(results: Path) -> str:
    lines = ["# Reproducing the papers' experiments on real data (scaled to a 2-core CPU)", "",
             f"Generated by `{COMMAND} report` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
             "from `results/*/runs.json` (one record per run, each with its seed). Values are mean ± standard "
             "deviation over seeds. MACs/FLOPs of STL layers include encode and decode. All data is offline "
             "(`make data`). Everything ran on a shared 2-core CPU with 1 thread per experiment; other jobs "
             "ran at the same time, so absolute seconds are noisy and only same-run ratios are reported.", ""]
    for name, folder, title, claim in SECTIONS:
        lines += [f"## {title}", "", f"**Paper's claim to test:** {claim}", ""]
        path = results / folder / "runs.json"
        if not path.is_file():
            lines += [f"_Not run yet: no `{path}`. The commands are in experiments/README.md (Long runs)._", ""]
            if folder in VERDICTS:
                lines += ["**Verdicts:**", ""] + VERDICTS[folder]([], None) + [""]
            continue
        data = json.loads(path.read_text())
        runs, meta = data["runs"], data["meta"]
        seeds = sorted({r["seed"] for r in runs})
        module = MODULES[name]
        cmds = list(dict.fromkeys(_commands(name, meta)))  # each command once, in first-run order
        lines += ["**Command" + ("s (in this order; later ones add records with --append)" if len(cmds) > 1 else "") + ":**", "",
                  "```bash", *cmds, "```", "",
                  f"**Scale:** {meta.get('scale', 'see config')}. Seeds: {seeds}. Written {meta.get('written_utc', '?')} "
                  f"(torch {meta.get('torch', '?')}, {meta.get('threads', '?')} thread(s)).", ""]
        lines += [module.table(runs), ""]
        if hasattr(module, "report_extra"):
            lines += module.report_extra(results / folder, runs)
        if folder in VERDICTS:
            lines += ["**Verdicts (computed from the records):**", ""] + VERDICTS[folder](runs, meta.get("config")) + [""]
        else:
            lines += ["**Measured against the claim:**", ""] + CHECKS[name](runs) + [""]
        lines += ["**Caveats of this scaled run:**", ""] + [f"- {c}" for c in CAVEATS.get(folder, [])] + [""]
        for png in sorted((results / folder).glob("*.png")):
            lines += [f"![{name}]({folder}/{png.name})", ""]
    return "\n".join(lines)


def run(args) -> int:
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "REPORT.md"
    text = build_report(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}")
    return 0
