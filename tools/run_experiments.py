"""Run a grid of arms x variants x seeds (see `slowqk experiment run --help`).

python tools/run_experiments.py GRID.yaml [--jobs N] [key=value | key=[a,b]]...
"""

import sys

from slowqk.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "run", *sys.argv[1:]]))
