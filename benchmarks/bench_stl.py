"""Run ``strassenkit bench`` (see benchmarks/README.md); all arguments are forwarded."""

import sys

from strassenkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
