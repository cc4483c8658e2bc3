"""``strassenkit experiment NAME [options]``: launch a paper experiment from the source checkout.

The experiments are not part of the installed package: they live in the top-level ``experiments/``
folder of the repository (see ``experiments/README.md``), and this command is a thin launcher for
``python experiments/run.py NAME [options]``. It looks for that folder, in this order:

1. ``$STRASSENKIT_EXPERIMENTS`` (a path to the folder), if set;
2. ``./experiments`` in the current directory;
3. the source checkout the package is installed from in editable mode (``pip install -e .``):
   ``<checkout>/experiments`` next to ``<checkout>/src/strassenkit``.

The folder is imported as the package ``experiments`` and its ``run.main`` runs in this process.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

ENV = "STRASSENKIT_EXPERIMENTS"
NAMES = "vit, spn_cnn, charlm, minilm, approx, rediscover or report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help=f"experiment to run: {NAMES} (see experiments/README.md)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options of that experiment (see NAME --help)")


def _is_experiments(folder: Path) -> bool:
    return (folder / "run.py").is_file() and (folder / "__init__.py").is_file()


def candidates() -> list[tuple[str, Path]]:
    """(where, folder) in the order they are tried."""
    import strassenkit

    out = []
    if os.environ.get(ENV):
        out.append((f"${ENV}", Path(os.environ[ENV]).expanduser()))
    out.append(("the current directory", Path.cwd() / "experiments"))
    out.append(("the source checkout (editable install)", Path(strassenkit.__file__).resolve().parents[2] / "experiments"))
    return out


def find_experiments() -> Path:
    """The experiments folder (see the module docstring); FileNotFoundError naming every option if none."""
    tried = candidates()
    if os.environ.get(ENV):  # an explicit setting must be right: no silent fallback
        tried = tried[:1]
    for _, folder in tried:
        if _is_experiments(folder):
            return folder.resolve()
    looked = "; ".join(f"{where}: {folder}" for where, folder in tried)
    if os.environ.get(ENV):
        looked += f" (${ENV} is set, so nothing else was tried)"
    raise FileNotFoundError(
        "strassenkit experiment: no experiments folder found (looked in " + looked + "). The experiments are "
        "not part of the installed package: they live in the experiments/ folder (with run.py and __init__.py) "
        "of the source checkout. Run from the checkout's root (./experiments), install the checkout in editable "
        f"mode (`pip install -e .`, as `make test` does), or set {ENV}=/path/to/checkout/experiments."
    )


def load_runner(folder: Path):
    """Import ``folder`` as the package ``experiments`` and return its ``run`` module."""
    folder = Path(folder).resolve()
    pkg = sys.modules.get("experiments")
    if pkg is not None:
        paths = [Path(p).resolve() for p in getattr(pkg, "__path__", [])]
        if folder not in paths:
            raise ImportError(f"a different module named 'experiments' is already imported "
                              f"({getattr(pkg, '__file__', None) or paths}); cannot load {folder}")
    else:
        spec = importlib.util.spec_from_file_location("experiments", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["experiments"] = pkg
        try:
            spec.loader.exec_module(pkg)
        except BaseException:
            del sys.modules["experiments"]
            raise
    return importlib.import_module("experiments.run")


def run(args) -> int:
    try:
        folder = find_experiments()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    return int(load_runner(folder).main([args.name, *args.rest], prog="strassenkit experiment") or 0)
