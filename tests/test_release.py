"""The adaptive Q/K release and the early warning: the decision logic, its keys, and the same
decision at every parallel layout through the real training loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_run_overrides
from multiproc import run_ranks

from slowqk.config import RecipeError, load_recipe
from slowqk.early_warning import SpecializationWarning
from slowqk.qk.release import AdaptiveRelease, DriftTracker
from slowqk.qk.schedule import MultiplierSchedule

# ------------------------------------------------------------------------------------ pure logic


def _release(min_hold=2, max_hold=10, threshold=0.5, smoothing=0.0) -> AdaptiveRelease:
    return AdaptiveRelease(min_hold, max_hold, 3, "linear", DriftTracker(threshold, smoothing))


def test_release_waits_for_the_drift_to_settle_then_ramps_like_the_fixed_schedule() -> None:
    rel = _release()
    drifts = [8.0, 6.0, 5.0, 4.5, 3.9, 3.0]  # peak 8; <= 4 (half of it) first after step 5
    decided = [rel.observe(i + 1, d) for i, d in enumerate(drifts)]
    assert decided == [False, False, False, False, True, False]
    assert (rel.release_step, rel.reason, rel.tracker.settled_at) == (5, "settled", 5)
    fixed = MultiplierSchedule(0.25, 5, 3, "linear")
    assert [rel.multiplier(s, 0.25) for s in range(12)] == [fixed(s) for s in range(12)]
    assert rel.record()["why"].startswith("lower layers settled at step 5")


def test_release_respects_min_hold_and_max_hold() -> None:
    early = _release(min_hold=4)
    for i, d in enumerate([8.0, 1.0, 1.0, 1.0, 1.0]):  # settled at step 2, but not before 4
        early.observe(i + 1, d)
    assert (early.tracker.settled_at, early.release_step, early.reason) == (2, 4, "settled")
    late = _release(max_hold=4)
    for i in range(6):
        late.observe(i + 1, 8.0 - 0.1 * i)  # never halves
    assert (late.release_step, late.reason) == (4, "max_hold")
    assert "had not settled" in late.describe()
    skipped = _release(max_hold=3)
    for i in range(3):
        skipped.observe(i + 1, None)  # skipped updates: nothing measured, the clock still runs
    assert (skipped.release_step, skipped.tracker.count) == (3, 0)
    assert _release(min_hold=0, max_hold=0).release_step == 0
    with pytest.raises(ValueError, match="min_hold <= max_hold"):
        _release(min_hold=5, max_hold=4)


def test_smoothing_is_bias_corrected_and_state_round_trips() -> None:
    t = DriftTracker(0.5, 0.9)
    t.update(1, 10.0)
    assert (
        t.smoothed == pytest.approx(10.0) and t.ratio == 1.0
    )  # no pull towards the EMA's zero start
    drifts = [10.0, 9.0, 7.0, 6.0, 5.5, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0]
    whole = _release(threshold=0.4, smoothing=0.8)
    for i, d in enumerate(drifts):
        whole.observe(i + 1, d)
    first = _release(threshold=0.4, smoothing=0.8)
    for i, d in enumerate(drifts[:4]):
        first.observe(i + 1, d)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    second = _release(threshold=0.4, smoothing=0.8)
    second.load_state_dict(state)
    for i, d in enumerate(drifts[4:], start=4):
        second.observe(i + 1, d)
    assert second.state_dict() == whole.state_dict() and whole.reason == "settled"


def test_early_warning_fires_only_while_the_lower_layers_drift() -> None:
    w = SpecializationWarning(upper=[2, 3], lower=[0, 1], gap=0.1)
    assert w.check(1, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, lower_drifting=True) is None  # the baseline
    assert w.check(5, {0: 0.95, 1: 0.95, 2: 0.9, 3: 0.9}, lower_drifting=True) is None  # gap 0.05
    event = w.check(10, {0: 0.95, 1: 0.95, 2: 0.6, 3: 0.8}, lower_drifting=True)
    assert event["new_episode"] and event["drop_upper"] == pytest.approx(0.3)
    assert event["drop_lower"] == pytest.approx(0.05)
    msg = SpecializationWarning.message(event)
    assert "step 10" in msg and "layers 2-3" in msg and "0.300" in msg and "layers 0-1" in msg
    assert not w.check(15, {0: 0.95, 1: 0.95, 2: 0.6, 3: 0.8}, lower_drifting=True)["new_episode"]
    assert w.check(20, {0: 0.95, 1: 0.95, 2: 0.5, 3: 0.5}, lower_drifting=False) is None  # settled
    assert w.record() == {"fired": True, "probes_firing": 2, "first": w.first, "gap": 0.1}
    both = SpecializationWarning(upper=[2, 3], lower=[0, 1], gap=0.1)
    both.check(1, {i: 1.0 for i in range(4)}, True)
    assert both.check(5, {i: 0.5 for i in range(4)}, True) is None  # all layers sharpen together


@pytest.mark.parametrize(
    "overrides, key, match",
    [
        (
            ["qk.adaptive.min_hold=0.2", "qk.adaptive.max_hold=0.1"],
            "qk.adaptive.min_hold",
            "must be <= qk.adaptive.max_hold",
        ),
        (["qk.adaptive.max_hold=0.995"], "qk.adaptive.max_hold", "more than the whole run"),
        (["qk.adaptive.max_hold=2"], "qk.adaptive.max_hold", "at most 1"),
        (
            [
                "qk.unit=steps",
                "qk.hold=3",
                "qk.ramp=2",
                "qk.adaptive.min_hold=2.5",
                "qk.adaptive.max_hold=9",
            ],
            "qk.adaptive.min_hold",
            "whole number",
        ),
        (
            ["qk.layers.top_fraction=null", "qk.layers.indices=[0,3]"],
            "qk.release",
            "includes layer 0",
        ),
        (["qk.adaptive.threshold=1.5"], "qk.adaptive.threshold", "less than 1"),
    ],
)
def test_bad_adaptive_keys_are_one_line_errors(overrides, key, match) -> None:
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe("tiny/gpt", ["qk.enabled=true", "qk.release=adaptive", *overrides])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_fixed_is_the_default_and_adaptive_keys_are_documented() -> None:
    from conftest import REPO

    recipe = load_recipe("tiny/gpt", [])
    assert recipe.qk.release == "fixed"
    readme = (REPO / "README.md").read_text()
    for key in (
        "qk.release",
        "qk.adaptive.min_hold",
        "qk.adaptive.max_hold",
        "qk.adaptive.threshold",
        "qk.adaptive.smoothing",
        "diagnostics.warn",
        "diagnostics.warn_entropy_gap",
    ):
        assert f"`{key}`" in readme, key


# ------------------------------------------------------------------ through the training loop

# where the lower layer's drift settles in these runs (threshold 0.7; ratios 0.75, 0.67 at 3, 4)
RELEASE = 4


def _overrides(dataset: str, out: Path, **extra) -> list[str]:
    return small_run_overrides(
        dataset,
        out,
        **{
            "train.steps": 8,
            "train.eval_interval": 8,
            "qk.adaptive.max_hold": 7,
            "qk.adaptive.threshold": 0.7,
            **extra,
        },
    )


def _train(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    return train(load_recipe("tiny/gpt", overrides), quiet=True)


def _records(run: Path) -> dict[int, dict]:
    from slowqk.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}


def _drift(run: Path) -> list[float]:
    return [r["lower_drift"] for r in _records(run).values() if "lower_drift" in r]


@pytest.mark.slow
def test_release_is_recorded_and_data_parallel_replicas_count_once(small_dataset, tmp_path) -> None:
    """The release in summary.json, metrics.jsonl and TensorBoard; DP=2 without the distributed
    optimizer (each rank holds all weights: only DP rank 0 counts them) measures the same drift as
    one process. TP=2, PP=2 and the distributed optimizer are compared in
    tests/test_diagnostics.py, and DeepSpeed ZeRO in tests/test_deepspeed.py."""
    layouts = {
        "single": (1, {"train.tensorboard": "true"}),
        "dp2": (2, {"parallel.distributed_optimizer": "false"}),
    }
    for name, (world, extra) in layouts.items():
        run_ranks(_train, world, _overrides(small_dataset, tmp_path / name, **extra))
    ref = tmp_path / "single"
    summary = json.loads((ref / "summary.json").read_text())
    release = summary["qk_release"]
    assert (release["rule"], release["step"], release["reason"]) == (
        "adaptive",
        RELEASE,
        "settled",
    ), release
    assert release["ramp_end"] == RELEASE + 2 and "settled at step" in release["why"]
    records = _records(ref)
    assert records[RELEASE]["qk_release"]["step"] == RELEASE  # the metrics record of the decision
    assert [records[s]["mult_q"] for s in range(1, 9)] == [0.25] * RELEASE + [0.5, 0.75, 1.0, 1.0]
    assert len(_drift(ref)) == RELEASE  # measured until the decision, not after
    for name in layouts:
        got = json.loads((tmp_path / name / "summary.json").read_text())["qk_release"]
        assert got["step"] == RELEASE and got["reason"] == "settled", (name, got)
        assert _drift(tmp_path / name) == pytest.approx(_drift(ref), rel=1e-4), name
    prov = summary["provenance"]
    assert prov["threads"] >= 1 and prov["packages"]["megatron-core"] and prov["python"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ref / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "qk_release/step" in tags and "lower_drift" in tags
    assert [e.value for e in events.Scalars("qk_release/step")] == [RELEASE]


@pytest.mark.slow
def test_adaptive_forced_at_the_fixed_hold_trains_bitwise_like_fixed(
    small_dataset, tmp_path
) -> None:
    """Measuring the drift only reads the weights: an adaptive run whose release is forced at the
    fixed rule's step (min_hold = max_hold = hold) has bitwise the fixed run's losses."""
    run_ranks(
        _train,
        1,
        _overrides(small_dataset, tmp_path / "fixed", **{"qk.release": "fixed", "qk.hold": 3}),
    )
    run_ranks(
        _train,
        1,
        _overrides(
            small_dataset,
            tmp_path / "forced",
            **{"qk.adaptive.min_hold": 3, "qk.adaptive.max_hold": 3},
        ),
    )
    fixed, forced = _records(tmp_path / "fixed"), _records(tmp_path / "forced")
    assert [(r["loss"], r["mult_q"]) for r in fixed.values()] == [
        (r["loss"], r["mult_q"]) for r in forced.values()
    ]
    assert (
        json.loads((tmp_path / "fixed" / "summary.json").read_text())["qk_release"]["rule"]
        == "fixed"
    )


def _warning_run(dataset: str, out: Path, **extra) -> tuple[dict, list[dict]]:
    from slowqk.monitor import read_diagnostics

    args = {
        **dict(a.split("=", 1) for a in _overrides(dataset, out)),
        "model.num_layers": 4,
        "train.steps": 24,
        "train.log_interval": 4,
        "train.eval_interval": 24,
        "diagnostics.interval": 3,
        "qk.release": "fixed",
        "qk.enabled": "false",
        "qk.hold": 0,
        "optimizer.warmup_steps": 5,
        **{k: str(v) for k, v in extra.items()},
    }
    run_ranks(_train, 1, [f"{k}={v}" for k, v in args.items() if not k.startswith("qk.adaptive.")])
    return json.loads((out / "summary.json").read_text()), read_diagnostics(
        out / "diagnostics.jsonl"
    )


@pytest.mark.slow
def test_early_warning_fires_in_a_harsh_run_and_stays_quiet_in_the_control(
    small_dataset, tmp_path
) -> None:
    """Harsh: no warmup, lr 1e-2 (3x the recipe's) and the upper layers' W_Q, W_K at 8x that (the
    opposite of the intervention): their attention sharpens within a few steps while the lower
    layers still move. The control has the same lr with a 5-step warmup and no Q/K boost."""
    harsh, harsh_diag = _warning_run(
        small_dataset,
        tmp_path / "harsh",
        **{
            "optimizer.warmup_steps": 0,
            "optimizer.lr": 0.01,
            "qk.enabled": "true",
            "qk.mult_q": 8,
            "qk.mult_k": 8,
            "qk.hold": 24,
            "qk.ramp": 0,
        },
    )
    control, control_diag = _warning_run(
        small_dataset, tmp_path / "control", **{"optimizer.lr": 0.01}
    )
    fired = harsh["specialization_warning"]
    assert fired["fired"] and fired["first"]["drop_upper"] - fired["first"]["drop_lower"] >= 0.1, (
        fired
    )
    assert fired["first"]["upper_layers"] == [2, 3] and fired["first"]["lower_layers"] == [0, 1]
    assert any("warning" in r for r in harsh_diag)
    assert control["specialization_warning"] == {
        "fired": False,
        "probes_firing": 0,
        "first": None,
        "gap": 0.1,
    }
    assert not any("warning" in r for r in control_diag)


def _initial_state(rank: int, world: int, tp: int, pp: int, model: dict) -> dict:
    from megatron.core import parallel_state
    from megatron_harness import VOCAB, gather_full_state, tiny_recipe

    from slowqk.distributed import init_distributed, shutdown
    from slowqk.models import build_gpt_model, build_transformer_config

    recipe = tiny_recipe(model=model, parallel={"tensor": tp, "pipeline": pp})
    init_distributed(recipe.parallel, recipe.seed)
    cfg = build_transformer_config(recipe.model, tensor_parallel=tp, pipeline_parallel=pp)
    built = build_gpt_model(
        recipe.model,
        cfg,
        VOCAB,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    state = gather_full_state(built, recipe.model.ffn == "swiglu")
    shutdown()
    return state


LLAMA_UNTIED = {
    "num_query_groups": 2,
    "ffn": "swiglu",
    "norm": "rmsnorm",
    "bias": False,
    "position": "rope",
    "tie_embeddings": False,
}


@pytest.mark.slow
@pytest.mark.parametrize("model", [{}, LLAMA_UNTIED], ids=["gpt-tied", "llama-untied"])
def test_the_same_seed_gives_the_same_initial_weights_at_any_layout(model) -> None:
    """megatron-core draws each pipeline stage's weights from the same seeded generator; without
    replaying the earlier stages, PP=2's layers 2-3 would start as PP=1's layers 0-1 do."""
    one = run_ranks(_initial_state, 1, 1, 1, model)[0]
    for tp, pp in ((1, 2), (2, 2)):
        got = run_ranks(_initial_state, tp * pp, tp, pp, model)[0]
        tied_copy = got.pop("output_layer.weight") if "output_layer.weight" not in one else None
        assert got.keys() == one.keys()
        differ = [k for k in one if not torch.equal(one[k], got[k])]
        assert not differ, (tp, pp, differ)
        if tied_copy is not None:  # the last stage's copy of the tied embedding
            assert torch.equal(tied_copy, one["embedding.word_embeddings.weight"])


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run_at_any_layout(small_dataset, tmp_path) -> None:
    """From scratch, one process vs PP=2 vs TP=2 x PP=2: the same step-1 loss (to fp32 rounding:
    the layouts reduce in other orders) and the adaptive release on the same step."""
    runs = {}
    for name, (world, extra) in {
        "single": (1, {}),
        "pp2": (2, {"parallel.pipeline": 2}),
        "tp2pp2": (4, {"parallel.tensor": 2, "parallel.pipeline": 2}),
    }.items():
        run_ranks(_train, world, _overrides(small_dataset, tmp_path / name, **extra))
        runs[name] = (
            _records(tmp_path / name),
            json.loads((tmp_path / name / "summary.json").read_text()),
        )
    ref, ref_summary = runs["single"]
    for name, (records, summary) in runs.items():
        assert records[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-6, abs=0), name
        assert summary["qk_release"]["step"] == ref_summary["qk_release"]["step"] == RELEASE, name
