"""Score a Hugging Face model with lm-evaluation-harness on local tasks (see `slowqk evaluate
--help`).

python tools/evaluate.py MODEL_DIR [--tasks a,b] [--limit N] [--out results.json] | --compare A.json
B.json
"""

import sys

from slowqk.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
