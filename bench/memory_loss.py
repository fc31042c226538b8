"""Memory/loss benchmark, the same as the ``eco-bench`` command; the logic lives in ``eco.benchmark``.

    python bench/memory_loss.py            # default run (about 20 minutes on 2 CPU cores)
    python bench/memory_loss.py --quick    # smoke run
    python bench/memory_loss.py --help
"""

import sys

from eco.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
