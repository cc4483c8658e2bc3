"""``python experiments/run.py NAME [options]``: run one paper experiment or build the report.

NAME is one of
- vit, spn_cnn, charlm, wordlm, minilm: each writes results/NAME/runs.json and PNG plots;
- approx: the tile-approximation study (results/approx/summary.json, approx.png, README.md);
- rediscover: learn ternary rank-7 2x2 matmul SPNs and verify them exactly (results/rediscover/summary.json);
- report: gather every table and plot of vit, spn_cnn, charlm, minilm into results/REPORT.md;
- longruns: issue #18's long runs (vit/full, spn_cnn/full, wordlm) as a queue that skips recorded runs.

``--quick`` gives a minutes-long smoke run; ``--plot-only [--out DIR]`` redraws the plots of an existing
runs.json without training (vit, spn_cnn, charlm, wordlm, minilm); ``python experiments/run.py NAME --help`` lists
the options of one experiment. ``strassenkit experiment NAME [options]`` is the same command.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python experiments/run.py ...`: import this folder as the package `experiments` (its modules use
    # relative imports) instead of exposing common, models, data... as top-level modules
    import importlib.util

    _here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == _here:
        sys.path.pop(0)
    _spec = importlib.util.spec_from_file_location("experiments", _here / "__init__.py",
                                                   submodule_search_locations=[str(_here)])
    _pkg = importlib.util.module_from_spec(_spec)
    sys.modules["experiments"] = _pkg
    _spec.loader.exec_module(_pkg)
    from experiments.run import main

    sys.exit(main())

import argparse
import importlib

from . import common

PROG = "python experiments/run.py"

EXPERIMENTS = {
    "vit": "STL ViT on Fashion-MNIST: dense vs STL inits vs low rank",
    "spn_cnn": "StrassenNets ternary CNN on Fashion-MNIST, budget sweep, KD",
    "charlm": "StrassenNets ternary char-level LM on Shakespeare",
    "wordlm": "StrassenNets ternary character-aware word-level LM (Kim et al. 2016) on Shakespeare",
    "minilm": "all-MiniLM-L6-v2 to STL + distillation vs 2:4 pruning",
    "approx": "tile-approximation study: init families vs rank (t=4), tensor, Gaussian and real-tile errors",
    "rediscover": "learn ternary rank-7 2x2 matmul SPNs from 25 random inits; verify exactly",
    "report": "gather results/*/runs.json into results/REPORT.md",
    "longruns": "issue #18's long runs as a resumable queue: runs every missing run, N at once (--dry-run lists them)",
}


def load(name: str):
    """The module of experiment ``name`` (imported on demand, so ``--help`` stays fast)."""
    return importlib.import_module(f"{__package__}.{name}")


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if sys.argv and "pytest" not in sys.argv[0]:  # recorded in runs.json (not for test runs)
        common.COMMAND = " ".join([prog, *argv])
    parser = argparse.ArgumentParser(prog=prog, description="Run one paper experiment or build the report.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(f"  {k:<11} {v}" for k, v in EXPERIMENTS.items()))
    parser.add_argument("name", choices=list(EXPERIMENTS), metavar="NAME", help="experiment to run (below)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options of that experiment (see NAME --help)")
    args = parser.parse_args(argv)
    module = load(args.name)
    if "--plot-only" in args.rest and hasattr(module, "plot") and hasattr(module, "table"):
        # redraw the PNG(s) and print the table from an existing runs.json (no training)
        rest = [a for a in args.rest if a != "--plot-only"]
        sub = argparse.ArgumentParser()
        module.add_arguments(sub)
        opts, _ = sub.parse_known_args(rest)
        if getattr(opts, "out", None) is None and hasattr(module, "PRESETS"):
            common.apply_budget(opts, module.PRESETS)  # the budget's folder (--budget, else the default budget's)
        out = Path(opts.out) if getattr(opts, "out", None) else Path("results") / args.name
        runs = common.read_runs(out)["runs"]
        print(module.plot(runs, out))
        print(module.table(runs))
        return 0
    sub = argparse.ArgumentParser(prog=f"{prog} {args.name}", description=EXPERIMENTS[args.name])
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(args.rest)) or 0)
