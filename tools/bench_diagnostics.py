"""Overhead of the in-training diagnostics: the same run with the probe off and on, side by side.

    python tools/bench_diagnostics.py [--recipe tiny/gpt] [--steps 200] [--interval 50] [--repeats 3]

Runs off/on pairs in alternating order (machine noise on a shared CPU is several percent per run)
and prints each pair's training seconds (the probe's time counts as training time) and the median
overhead in percent. Extra arguments are recipe overrides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(recipe: str, overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "slowqk.cli", "train", recipe, *overrides, f"out_dir={out}",
           "train.progress_bar=false", "train.tensorboard=false", "--no-resume", "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tiny/gpt")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--interval", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [*args.overrides, f"train.steps={args.steps}", f"train.eval_interval={args.steps}"]
    arms = {"off": [*base, "diagnostics.interval=0"], "on": [*base, f"diagnostics.interval={args.interval}"]}
    print(f"{args.recipe}, {args.steps} steps, probe every {args.interval} steps")
    overheads = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            order = ["off", "on"] if i % 2 == 0 else ["on", "off"]
            secs = {arm: run(args.recipe, arms[arm], Path(tmp, f"{arm}{i}"))["train_seconds"] for arm in order}
            overheads.append(100.0 * (secs["on"] / secs["off"] - 1.0))
            print(f"  pair {i + 1}: off {secs['off']:.2f} s, on {secs['on']:.2f} s, overhead {overheads[-1]:+.2f}%")
    overheads.sort()
    print(f"  median overhead: {overheads[len(overheads) // 2]:+.2f}%")


if __name__ == "__main__":
    main()
