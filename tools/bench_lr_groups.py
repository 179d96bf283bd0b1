"""Cost of the learning-rate groups per step, side by side with a run without groups.

    python tools/bench_lr_groups.py [--recipe tiny/gpt] [--steps 100] [--repeats 3] [--quack]
        [overrides...]

Three arms with the same training: no groups ("off"); one group over ``--params`` of every layer
at multiplier 0.5 for the whole run ("on"; the default, every element of every layer and the
embedding, is the worst case: every update snapshotted and rescaled at every step); the same group
at multiplier 1 ("idle": the hooks return at once; ``--skip-idle`` leaves it out). Pairs run in
alternating order; prints each pair's training seconds, the run-to-run
overhead and the hooks' own time measured inside the run (``lr_groups_seconds`` in summary.json),
which machine noise does not move. ``--quack``: the group is QuacK over Q and K of every layer
(tau 1; its per-head norms are computed before every step, so it is never idle). Extra arguments
are recipe overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# one way to run and compare pairs, after the path above
from bench_diagnostics import compare_pairs, pair_arguments  # noqa: E402

EVERY_PART = "q,k,v,o,fc1,fc2,norm,embedding"


def main() -> None:
    ap = pair_arguments(__doc__, 100)
    ap.add_argument(
        "--params",
        default=EVERY_PART,
        help=f"the group's parts, comma-separated (default {EVERY_PART})",
    )
    ap.add_argument("--skip-idle", action="store_true")
    ap.add_argument("--quack", action="store_true", help="QuacK over q, k of every layer")
    args = ap.parse_args()
    n = args.steps
    base = [
        *args.overrides,
        f"train.steps={n}",
        f"train.eval_interval={n}",
        "diagnostics.interval=0",
        "qk.enabled=false",
    ]
    if args.quack:
        quack = [*base, "lr_groups=[{rule: quack, params: [q, k], mult: 1.0}]"]
        print(f"{args.recipe}, {n} steps, QuacK over q, k of every layer (tau 1)")
        compare_pairs(
            args.recipe, {"off": base, "on": quack}, args.repeats, "lr_groups_seconds", "hooks"
        )
        return
    groups = {
        mult: [*base, f"lr_groups=[{{params: [{args.params}], mult: {mult}}}]"]
        for mult in (0.5, 1.0)
    }
    print(f"{args.recipe}, {n} steps, one group over {args.params} of every layer")
    print("active (mult 0.5):")
    compare_pairs(
        args.recipe, {"off": base, "on": groups[0.5]}, args.repeats, "lr_groups_seconds", "hooks"
    )
    if args.skip_idle:
        return
    print("idle (mult 1):")
    compare_pairs(
        args.recipe, {"off": base, "on": groups[1.0]}, args.repeats, "lr_groups_seconds", "hooks"
    )


if __name__ == "__main__":
    main()
