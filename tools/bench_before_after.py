"""Two trees' paired benches side by side: ``bench_before_r*.json`` and ``bench_main_r*.json`` in
a folder (rounds alternated between the trees), each case's ratio to plain PyTorch measured
within its process, per round, and the median after/before.

    python tools/bench_before_after.py docs/results/house
"""

import json
import statistics
import sys
from pathlib import Path


def ratios(folder: Path) -> dict[tuple, dict[str, list[float]]]:
    rows: dict[tuple, dict[str, list[float]]] = {}
    for tree in ("before", "main"):
        for path in sorted(folder.glob(f"bench_{tree}_r*.json")):
            recs = json.loads(path.read_text())
            # each megatron case has its own plain twin in its process (the same "group")
            plain = {
                (x["recipe"], x["nproc"], x["group"]): x["tokens_per_s"]
                for x in recs
                if x["case"] == "plain"
            }
            for x in recs:
                if x["case"] != "plain":
                    key = (x["recipe"], x["nproc"], x["case"])
                    ratio = x["tokens_per_s"] / plain[(x["recipe"], x["nproc"], x["group"])]
                    rows.setdefault(key, {}).setdefault(tree, []).append(ratio)
    return rows


def main(folder: Path) -> None:
    print(
        f"{'recipe':12} {'ranks':>5} {'case':5} {'before, per round':>22} "
        f"{'after, per round':>22} {'after/before':>13}"
    )
    for (recipe, n, case), v in sorted(ratios(folder).items()):
        before, after = v["before"], v["main"]
        change = statistics.median(after) / statistics.median(before)
        cells = [" ".join(f"{x:.3f}" for x in xs) for xs in (before, after)]
        print(f"{recipe:12} {n:>5} {case:5} {cells[0]:>22} {cells[1]:>22} {change:>12.3f}x")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
