"""``strassenkit experiment NAME [options]``: run one paper-reproduction experiment or build the report.

NAME is one of vit, spn_cnn, charlm, minilm (each writes results/NAME/runs.json and PNG plots) or report
(gathers every table and plot into results/REPORT.md). ``--quick`` gives a minutes-long smoke run;
``--plot-only [--out DIR]`` redraws the plots of an existing runs.json without training;
``strassenkit experiment NAME --help`` lists the options of one experiment.
"""

from __future__ import annotations

import argparse
import importlib
import sys

EXPERIMENTS = {
    "vit": ("strassenkit.experiments.vit", "STL ViT on Fashion-MNIST: dense vs STL inits vs low rank"),
    "spn_cnn": ("strassenkit.experiments.spn_cnn", "StrassenNets ternary CNN on Fashion-MNIST, budget sweep, KD"),
    "charlm": ("strassenkit.experiments.charlm", "StrassenNets ternary char-level LM on Shakespeare"),
    "minilm": ("strassenkit.experiments.minilm", "all-MiniLM-L6-v2 to STL + distillation vs 2:4 pruning"),
    "report": ("strassenkit.experiments.report", "gather results/*/runs.json into results/REPORT.md"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="experiment to run")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options of that experiment (see NAME --help)")


def run(args) -> int:
    module_path, help_text = EXPERIMENTS[args.name]
    module = importlib.import_module(module_path)
    if "--plot-only" in args.rest and hasattr(module, "plot"):
        # redraw the PNG(s) and print the table from an existing runs.json (no training)
        from pathlib import Path

        from .exp_common import read_runs

        rest = [a for a in args.rest if a != "--plot-only"]
        out = Path(rest[rest.index("--out") + 1]) if "--out" in rest else Path("results") / args.name
        runs = read_runs(out)["runs"]
        print(module.plot(runs, out))
        print(module.table(runs))
        return 0
    sub = argparse.ArgumentParser(prog=f"strassenkit experiment {args.name}", description=help_text)
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(args.rest)) or 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="strassenkit experiment")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
