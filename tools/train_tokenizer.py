"""Train a SentencePiece tokenizer on a sample of local corpora (see `slowqk tokenizer train
--help`)."""

import sys

from slowqk.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenizer", "train", *sys.argv[1:]]))
