"""Command line: ``strassenkit <command>`` (also ``python -m strassenkit <command>``).

Each command lives in its own module of :mod:`strassenkit.commands`, exposing ``add_arguments(parser)``
and ``run(args) -> int``; ``COMMANDS`` maps the command name to (module path, one-line help). Modules are
imported lazily so ``strassenkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("strassenkit.commands.demo", "train a small ViT on sklearn digits, dense vs STL (t=4, r=24)"),
    "algorithms": ("strassenkit.commands.algorithms", "list and verify the exact algorithm catalogue"),
    "bench": ("strassenkit.commands.bench", "wall-clock STL vs dense F.linear (forward, training step) -> results/bench/"),
    "train": ("strassenkit.commands.train", "resumable training (AdamW, cosine, KD, checkpoints, DDP) on a built-in task"),
    "native": ("strassenkit.commands.native", "build the native C++ STL kernels now (else on first use) and report"),
    "experiment": ("strassenkit.commands.experiment",
                   "paper experiments from the source checkout's experiments/ folder: "
                   "vit, spn_cnn, charlm, minilm, approx, rediscover, report"),
}


# errors that come from what the user passed (bad values, paths, files): reported in one line, exit 2
USER_ERRORS = (ValueError, TypeError, KeyError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strassenkit", description="Learnable fast bilinear operators for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_path, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_path)
        # argument definitions are imported lazily only for the chosen command (see main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"strassenkit {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        try:
            return int(module.run(args) or 0)
        except USER_ERRORS as e:
            if os.environ.get("STRASSENKIT_TRACEBACK"):
                raise
            # like argparse: one line and exit status 2 (STRASSENKIT_TRACEBACK=1 shows the traceback)
            msg = " ".join(str(e).split()) if str(e) else type(e).__name__
            if isinstance(e, KeyError) and e.args:
                msg = " ".join(str(e.args[0]).split())
            print(f"strassenkit {argv[0]}: error: {msg}", file=sys.stderr)
            return 2
    parser.parse_args(argv)  # prints help / errors for unknown commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
