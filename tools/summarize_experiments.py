"""Summary table (paired 95% CIs) and plots of a grid directory.

python tools/summarize_experiments.py GRID_DIR [--out DIR]
"""

import sys

from slowqk.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "summarize", *sys.argv[1:]]))
