"""The ``eco-bench`` console script: runs the memory/loss benchmark (:mod:`eco.benchmark`)."""

import sys

from .benchmark import main as _benchmark_main


def main() -> int:
    return _benchmark_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
