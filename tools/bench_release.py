"""Cost of measuring the lower layers' drift (the adaptive release's signal), side by side.

    python tools/bench_release.py [--recipe tiny/gpt] [--steps 100] [--repeats 3] [overrides...]

Two arms with identical training: the fixed rule holding for the whole run ("off": nothing is
measured) and the adaptive rule with a threshold it never reaches ("on": the drift is measured at
every step of the run, the worst case; a real run stops measuring at the release). Pairs run in
alternating order; prints each pair's training seconds, the run-to-run overhead and the meter's own
time measured inside the "on" run (``drift_seconds`` in summary.json), which machine noise does not
move. Extra arguments are recipe overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# one way to run and compare pairs, after the path above
from bench_diagnostics import compare_pairs, pair_arguments  # noqa: E402


def main() -> None:
    args = pair_arguments(__doc__, 100).parse_args()
    n = args.steps
    base = [
        *args.overrides,
        f"train.steps={n}",
        f"train.eval_interval={n}",
        "diagnostics.interval=0",
        "qk.enabled=true",
        "qk.unit=steps",
        f"qk.hold={n}",
        "qk.ramp=0",
    ]
    arms = {
        "off": [*base, "qk.release=fixed"],
        "on": [
            *base,
            "qk.release=adaptive",
            "qk.adaptive.threshold=1e-9",
            "qk.adaptive.min_hold=0",
            f"qk.adaptive.max_hold={n}",
        ],
    }
    print(f"{args.recipe}, {n} steps, drift measured at every step in the 'on' arm")
    compare_pairs(args.recipe, arms, args.repeats, "drift_seconds", "meter")


if __name__ == "__main__":
    main()
