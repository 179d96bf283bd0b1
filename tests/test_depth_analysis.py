"""tools/depth_analysis.py on made-up runs whose answers are known: the delay (M1), the
correlation pooled after centring within depth (M2) and the warning's reading (M3)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

from depth_analysis import analyse, fisher_interval  # noqa: E402

from slowqk.summary import RunResult  # noqa: E402

PROBES = [1, 2, 4, 8, 16, 32, 51]


def _run(
    tmp: Path,
    variant: str,
    arm: str,
    seed: int,
    loss: float,
    upper: float,
    lower: float,
    spec: list[int | None],
    warning: dict | None = None,
) -> RunResult:
    """A 4-layer run: lower layers 0-1 at entropy ``lower``, upper 2-3 at ``upper`` from step 16."""
    run_dir = tmp / variant / arm / f"seed{seed}"
    run_dir.mkdir(parents=True)
    summary = {
        "steps": 50,
        "specialization": {"steps": {"0.9": spec}},
        "specialization_warning": warning,
        "lr_groups_seconds": 0.0,
        "train_seconds": 10.0,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    diagnostics = [
        {
            "step": s,
            "layers": {
                str(i): {"entropy": (upper if i >= 2 and s >= 16 else lower)} for i in range(4)
            },
        }
        for s in PROBES
    ]
    return RunResult(variant, arm, seed, run_dir, loss, [(50, loss)], diagnostics=diagnostics)


def test_delay_prediction_and_warning_on_known_runs(tmp_path) -> None:
    runs = []
    for d, variant in enumerate(("d4", "d8", "d16")):
        for seed in range(1, 5):
            gap = -0.1 * seed  # the control's upper layers sharper with the seed
            # a benefit (control - recipe loss) growing as the gap falls, positive for seeds 3-4,
            # plus a small offset per depth that only centring removes
            benefit = 0.01 * (seed - 2.5) + 0.002 * d
            warning = {"fired": seed >= 3, "first": {"step": 16} if seed >= 3 else None}
            control = 3.0 + d + benefit
            runs.append(
                _run(
                    tmp_path,
                    variant,
                    "control",
                    seed,
                    control,
                    0.9 + gap,
                    0.9,
                    [50, 50, 8, 16],
                    warning,
                )
            )
            # the recipe: upper layers specialize 8 steps later, entropy at 16 higher by 0.05
            runs.append(
                _run(tmp_path, variant, "slowqk", seed, 3.0 + d, 0.95 + gap, 0.9, [50, 50, 16, 24])
            )
    result = analyse(runs)
    delays = {d["variant"]: d for d in result["M1_delay"]}
    assert delays["d8"]["upper_spec_step"]["mean"] == pytest.approx(8.0)
    assert delays["d8"]["upper_entropy_early"]["mean"] == pytest.approx(0.05)
    pred = result["M2_prediction"]
    # centring within depth removes the depth offset: benefit falls linearly with the gap
    assert pred["n"] == 12 and pred["r"] == pytest.approx(-1.0)
    warning = result["M3_warning"]
    assert warning["fired"] == 6  # seeds 3-4 at every depth
    assert warning["benefit_fired"] > warning["benefit_quiet"]
    assert warning["proposed"]["balanced_accuracy"] == pytest.approx(1.0)


def test_fisher_interval_contains_r_and_widens_with_fewer_pairs() -> None:
    wide, narrow = fisher_interval(0.5, 5), fisher_interval(0.5, 50)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    assert all(math.isnan(x) for x in fisher_interval(1.0, 10))
