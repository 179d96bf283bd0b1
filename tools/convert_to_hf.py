"""Export a checkpoint (any TP/PP) to a Hugging Face model directory (see `slowqk export-hf
--help`).

python tools/convert_to_hf.py CHECKPOINT OUT [--dtype bfloat16] [--max-shard-size 2GB] [--check-val]
"""

import sys

from slowqk.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-hf", *sys.argv[1:]]))
