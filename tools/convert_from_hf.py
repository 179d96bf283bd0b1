"""Import a Hugging Face GPT-2 / LLaMA directory as a weights-only checkpoint (see `slowqk import-hf
--help`).

python tools/convert_from_hf.py HF_DIR OUT --recipe RECIPE [--tp N] [--pp N]
"""

import sys

from slowqk.cli import main

if __name__ == "__main__":
    sys.exit(main(["import-hf", *sys.argv[1:]]))
