"""Check a sharded dataset against its manifest, or show what is in it.

python tools/verify_dataset.py DIR            # verify
python tools/verify_dataset.py DIR --inspect  # decoded documents and statistics
"""

import sys

from slowqk.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--inspect" in args:
        args.remove("--inspect")
        sys.exit(main(["data", "inspect", *args]))
    sys.exit(main(["data", "verify", *args]))
