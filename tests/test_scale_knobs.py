"""megatron-core's scale knobs (activation recomputation, sequence parallelism, overlapped gradient
reduce and parameter gather) change no number they should not: each alone and all together, the
losses, validation loss, adaptive release and diagnostics of a 20-step run against the same recipe
without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import small_run_overrides
from multiproc import run_ranks

STEPS = 20


def _train(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    return train(load_recipe("tiny/gpt", overrides), quiet=True)


def _run(dataset: str, out: Path, world: int, **knobs) -> dict:
    overrides = small_run_overrides(
        dataset,
        out,
        **{
            "train.steps": STEPS,
            "train.eval_interval": 10,
            "qk.adaptive.max_hold": 12,
            "qk.adaptive.threshold": 0.5,
            "diagnostics.interval": 5,
            "diagnostics.probe_samples": 2,
            "diagnostics.warn_entropy_gap": 0.00001,
            **knobs,
        },
    )
    summary = run_ranks(_train, world, overrides)[0]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    diag = [json.loads(x) for x in (out / "diagnostics.jsonl").read_text().splitlines()]
    return {
        "losses": [r["loss"] for r in rows if "loss" in r],
        "val": summary["final_val_loss"],
        "release": summary["qk_release"]["step"],
        "warning": summary["specialization_warning"]["fired"],
        "entropy": [d["layers"]["1"]["entropy"] for d in diag],
    }


def _same_bits(a: dict, b: dict) -> None:
    assert a == b


# each knob alone, at the smallest layout it needs: (world size, layout keys, knob keys)
BITWISE = {
    "recompute-full": (1, {}, {"train.recompute.granularity": "full"}),
    "recompute-full-block": (
        1,
        {},
        {"train.recompute.granularity": "full", "train.recompute.method": "block"},
    ),
    "recompute-selective": (1, {}, {"train.recompute.granularity": "selective"}),
    "recompute-selective-mlp": (
        1,
        {"model.bias": "false"},
        {
            "train.recompute.granularity": "selective",
            "train.recompute.modules": "[core_attn, mlp]",
        },
    ),
    "overlap-grad-reduce": (2, {}, {"parallel.overlap_grad_reduce": "true"}),
    "overlap-both": (
        2,
        {},
        {"parallel.overlap_grad_reduce": "true", "parallel.overlap_param_gather": "true"},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BITWISE))
def test_a_knob_that_keeps_the_arithmetic_keeps_every_bit(small_dataset, tmp_path, case) -> None:
    world, layout, knobs = BITWISE[case]
    without = _run(small_dataset, tmp_path / "without", world, **layout)
    with_knob = _run(small_dataset, tmp_path / "with", world, **layout, **knobs)
    assert len(without["losses"]) == STEPS and len(without["entropy"]) == 4
    assert without == with_knob


# knobs that change the order of a reduction: (world size, layout keys, knob keys, tolerance).
# Bucket boundaries move the distributed optimizer's shards, so the gradient norm sums its
# pieces in another order; sequence parallelism reduces the norms' gradients over the tensor
# ranks and reduce-scatters what TP alone all-reduces; virtual stages give each rank two
# gradient buffers (likely the gradient norm's sum grouped otherwise: equal losses for the first
# steps, then last-bit differences). Largest relative difference of a loss or an entropy over
# the 20 steps, measured: 7.3e-8 (buckets), 6.2e-8 (SP), 2.5e-8 (virtual stages, untied
# embeddings), 2.4e-8 (together at TP2 x DP2), 4.9e-8 (together at TP2 x PP2 with VPP2).
WITHIN = {
    "small-buckets": (
        2,
        {},
        {"parallel.overlap_grad_reduce": "true", "parallel.bucket_size": 20000},
        1e-6,
    ),
    "sequence-parallel": (2, {"parallel.tensor": 2}, {"parallel.sequence_parallel": "true"}, 1e-6),
    "virtual-pipeline": (
        2,
        {"parallel.pipeline": 2, "model.num_layers": 4, "model.tie_embeddings": "false"},
        {"parallel.virtual_pipeline": 2},
        1e-6,
    ),
    "all-together-pipelined": (
        4,
        {
            "parallel.tensor": 2,
            "parallel.pipeline": 2,
            "model.num_layers": 4,
            "model.tie_embeddings": "false",
        },
        {
            "parallel.virtual_pipeline": 2,
            "parallel.sequence_parallel": "true",
            "parallel.overlap_grad_reduce": "true",
            "parallel.overlap_param_gather": "true",
            "train.recompute.granularity": "selective",
        },
        1e-6,
    ),
    "all-together": (
        4,
        {"parallel.tensor": 2},
        {
            "parallel.sequence_parallel": "true",
            "parallel.overlap_grad_reduce": "true",
            "parallel.overlap_param_gather": "true",
            "parallel.bucket_size": 20000,
            "train.recompute.granularity": "selective",
        },
        1e-6,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(WITHIN))
def test_a_knob_that_reorders_a_sum_stays_within_rounding(small_dataset, tmp_path, case) -> None:
    world, layout, knobs, tol = WITHIN[case]
    without = _run(small_dataset, tmp_path / "without", world, **layout)
    with_knob = _run(small_dataset, tmp_path / "with", world, **layout, **knobs)
    assert (with_knob["release"], with_knob["warning"]) == (without["release"], without["warning"])
    for key in ("losses", "entropy"):
        assert with_knob[key] == pytest.approx(without[key], rel=tol), key
    assert with_knob["val"] == pytest.approx(without["val"], rel=tol)


# what cannot compose: the overrides, and the two keys the one-line refusal must name
REFUSED = {
    "sp-without-tp": (
        ["parallel.sequence_parallel=true"],
        ("parallel.sequence_parallel", "parallel.tensor"),
    ),
    "sp-uneven-sequence": (
        ["parallel.sequence_parallel=true", "parallel.tensor=2", "model.seq_length=33"],
        ("parallel.sequence_parallel", "model.seq_length"),
    ),
    "gather-without-distributed-optimizer": (
        [
            "parallel.overlap_param_gather=true",
            "parallel.overlap_grad_reduce=true",
            "parallel.distributed_optimizer=false",
        ],
        ("parallel.overlap_param_gather", "parallel.distributed_optimizer"),
    ),
    "gather-without-reduce": (
        ["parallel.overlap_param_gather=true"],
        ("parallel.overlap_param_gather", "parallel.overlap_grad_reduce"),
    ),
    "deepspeed": (
        ["parallel.engine=deepspeed", "parallel.overlap_grad_reduce=true"],
        ("parallel.engine", "parallel.overlap_grad_reduce"),
    ),
    "compile-recompute": (
        ["train.compile=true", "train.recompute.granularity=full"],
        ("train.compile", "train.recompute"),
    ),
    "selective-with-layers": (
        ["train.recompute.granularity=selective", "train.recompute.num_layers=1"],
        ("train.recompute.num_layers", "train.recompute.granularity"),
    ),
    "layernorm-without-te": (
        ["train.recompute.granularity=selective", "train.recompute.modules=[layernorm]"],
        ("train.recompute.modules", "model.attention_backend"),
    ),
    "mlp-with-bias": (
        ["train.recompute.granularity=selective", "train.recompute.modules=[mlp]"],
        ("train.recompute.modules", "model.bias"),
    ),
    "virtual-without-pipeline": (
        ["model.tie_embeddings=false", "parallel.virtual_pipeline=2"],
        ("parallel.virtual_pipeline", "parallel.pipeline"),
    ),
    "virtual-layers-do-not-divide": (
        ["model.tie_embeddings=false", "parallel.pipeline=2", "parallel.virtual_pipeline=4"],
        ("parallel.virtual_pipeline", "model.num_layers"),
    ),
    "virtual-with-tied-embeddings": (
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
        ("parallel.virtual_pipeline", "model.tie_embeddings"),
    ),
    "context-parallel-without-te": (
        ["parallel.context_parallel=2", "model.attention_backend=sdpa"],
        ("parallel.context_parallel", "model.attention_backend"),
    ),
    "context-parallel-untested-with-te": (
        ["parallel.context_parallel=2", "model.attention_backend=auto"],
        ("parallel.context_parallel", "model.attention_backend"),
    ),
    "full-more-layers-than-a-stage": (
        ["train.recompute.granularity=full", "train.recompute.num_layers=3", "parallel.pipeline=2"],
        ("train.recompute.num_layers", "parallel.pipeline"),
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_compose_is_refused_naming_both_keys(case) -> None:
    from slowqk.config import RecipeError, load_recipe

    overrides, keys = REFUSED[case]
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny/gpt", ["model.num_layers=4", *overrides])
    message = str(err.value)
    assert "\n" not in message
    assert all(key in message for key in keys), message


def test_a_refused_combination_exits_2_in_one_line(tmp_path) -> None:
    from multiproc import run_cli

    proc = run_cli(["print-recipe", "tiny/gpt", "parallel.sequence_parallel=true"], cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "parallel.sequence_parallel" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_checkpoint_saved_with_the_knobs_resumes_without_them(small_dataset, tmp_path) -> None:
    """Saved at step 10 with both overlaps (the parameter gather still in flight when the save
    comes) and recomputation, resumed with neither: steps 11-20 bitwise those of a run that never
    had them."""
    from test_training import _resume_copy

    knobs = {
        "parallel.overlap_grad_reduce": "true",
        "parallel.overlap_param_gather": "true",
        "train.recompute.granularity": "full",
    }
    reference = _run(small_dataset, tmp_path / "reference", 2)
    _run(small_dataset, tmp_path / "knobs", 2, **knobs, **{"train.save_interval": 10})
    resumed = tmp_path / "resumed"
    _resume_copy(tmp_path / "knobs", resumed, 10)
    again = _run(small_dataset, resumed, 2)
    assert again["losses"] == reference["losses"][10:]
    assert (again["val"], again["release"]) == (reference["val"], reference["release"])


@pytest.mark.slow
def test_a_checkpoint_of_two_virtual_stages_resumes_with_one(small_dataset, tmp_path) -> None:
    """PP2 x VPP2 saved at step 10 (each rank's two chunks), resumed at PP2 without virtual
    stages: steps 11-20 within the virtual stages' rounding of the run that never had them."""
    from test_training import _resume_copy

    layout = {"parallel.pipeline": 2, "model.num_layers": 4, "model.tie_embeddings": "false"}
    reference = _run(small_dataset, tmp_path / "reference", 2, **layout)
    vpp = {"parallel.virtual_pipeline": 2, "train.save_interval": 10}
    _run(small_dataset, tmp_path / "vpp", 2, **layout, **vpp)
    resumed = tmp_path / "resumed"
    _resume_copy(tmp_path / "vpp", resumed, 10)
    again = _run(small_dataset, resumed, 2, **layout)
    assert again["losses"] == pytest.approx(reference["losses"][10:], rel=1e-6)
    assert again["release"] == reference["release"]
