"""Tokenize local corpora into sharded megatron-core datasets (see `slowqk data shard --help`).

python tools/shard_dataset.py INPUT... --out DIR --tokenizer TOK [--workers N] [--split 98,1,1]
"""

import sys

from slowqk.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "shard", *sys.argv[1:]]))
