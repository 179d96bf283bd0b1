"""Overhead of the in-training diagnostics: the same run with the probe off and on, side by side.

    python tools/bench_diagnostics.py [--recipe tiny/gpt] [--steps 200] [--interval 50] [--repeats
    3] [--log-spaced]

Runs off/on pairs in alternating order (machine noise on a shared CPU is several percent per run)
and prints each pair's training seconds (the probe's time counts as training time) and the median
overhead in percent, both between runs and as the probe's own time measured inside the "on" run
(``diagnostics_seconds`` in summary.json), which machine noise does not move. Extra arguments are
recipe overrides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from slowqk.qk.specialization import probe_steps


def run(recipe: str, overrides: list[str], out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "slowqk.cli",
        "train",
        recipe,
        *overrides,
        f"out_dir={out}",
        "train.progress_bar=false",
        "train.tensorboard=false",
        "--no-resume",
        "--quiet",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def pair_arguments(doc: str, steps: int) -> argparse.ArgumentParser:
    """The options every off/on bench takes: --recipe, --steps, --repeats and recipe overrides."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="tiny/gpt")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    return ap


def main() -> None:
    ap = pair_arguments(__doc__, 200)
    ap.add_argument("--interval", type=int, default=50)
    ap.add_argument(
        "--log-spaced", action="store_true", help="probe also at 1, 2, 4, ... below --interval"
    )
    args = ap.parse_args()
    base = [*args.overrides, f"train.steps={args.steps}", f"train.eval_interval={args.steps}"]
    on = [f"diagnostics.interval={args.interval}", f"diagnostics.log_spaced={args.log_spaced}"]
    arms = {"off": [*base, "diagnostics.interval=0"], "on": [*base, *on]}
    early = sorted(probe_steps(args.interval, args.log_spaced, []))
    also = f" and at steps {', '.join(map(str, early))}" if early else ""
    print(f"{args.recipe}, {args.steps} steps, probe every {args.interval} steps{also}")
    compare_pairs(args.recipe, arms, args.repeats, "diagnostics_seconds", "probe")


def compare_pairs(
    recipe: str, arms: dict[str, list[str]], repeats: int, inside_key: str, what: str
) -> None:
    """Run "off"/"on" pairs in alternating order; print each pair and the median overheads, between
    runs and as ``what``'s own time recorded inside the "on" run (summary.json's ``inside_key``)."""
    overheads, inside = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            order = ["off", "on"] if i % 2 == 0 else ["on", "off"]
            runs = {arm: run(recipe, arms[arm], Path(tmp, f"{arm}{i}")) for arm in order}
            secs = {arm: r["train_seconds"] for arm, r in runs.items()}
            own = runs["on"][inside_key]
            overheads.append(100.0 * (secs["on"] / secs["off"] - 1.0))
            inside.append(100.0 * own / (secs["on"] - own))
            print(
                f"  pair {i + 1}: off {secs['off']:.2f} s, on {secs['on']:.2f} s, overhead "
                f"{overheads[-1]:+.2f}% (run-to-run); {what} time inside the run {own:.3f} s = "
                f"{inside[-1]:.3f}% of the rest"
            )
    overheads.sort()
    inside.sort()
    print(
        f"  median overhead: {overheads[len(overheads) // 2]:+.2f}% off-vs-on, "
        f"{inside[len(inside) // 2]:.3f}% measured inside the run (the {what}'s own time; immune "
        "to machine noise)"
    )


if __name__ == "__main__":
    main()
