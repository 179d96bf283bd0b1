"""Train a SentencePiece tokenizer on a text corpus and write train/valid megatron-core datasets.

python tools/prepare_data.py CORPUS.txt --out data/ [--vocab-size 32000] [--valid-fraction 0.01]
"""

import sys

from slowqk.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare-data", *sys.argv[1:]]))
