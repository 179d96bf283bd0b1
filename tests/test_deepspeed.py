"""DeepSpeed ZeRO 1/2/3 as the data-parallel engine: the same losses as the megatron-core path, and
the learning-rate groups (Q/K rows and the other parts) moving exactly their elements by their
multipliers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import small_run_overrides
from multiproc import run_ranks

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e .[deepspeed])")
pytestmark = pytest.mark.slow


def _overrides(dataset: str, out: Path, **extra) -> list[str]:
    # the adaptive release: both engines must measure the same drift and release at the same step
    return small_run_overrides(
        dataset,
        out,
        **{
            # Adam amplifies rounding on tiny gradients; see the Q/K exactness notes
            "optimizer.eps": 1e-3,
            "qk.adaptive.max_hold": 5,
            "qk.adaptive.threshold": 0.76,
            # diagnostics with the early warning: the same records on both engines
            "diagnostics.interval": 2,
            "diagnostics.probe_samples": 2,
            **extra,
        },
    )  # settles at step 4


def _megatron(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    return train(
        load_recipe("tiny/gpt", [*overrides, "parallel.distributed_optimizer=true"]), quiet=True
    )


def _deepspeed(rank: int, world: int, overrides: list[str], stage: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from slowqk.config import load_recipe
    from slowqk.train import train

    return train(
        load_recipe(
            "tiny/gpt", [*overrides, "parallel.engine=deepspeed", f"parallel.zero_stage={stage}"]
        ),
        quiet=True,
    )


def _losses(run: Path) -> dict[int, float]:
    from slowqk.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def _diagnostics(run: Path) -> list[dict]:
    from slowqk.monitor import read_diagnostics

    return read_diagnostics(run / "diagnostics.jsonl")


def _drift(run: Path) -> list[float]:
    from slowqk.metrics import read_metrics

    return [r["lower_drift"] for r in read_metrics(run / "metrics.jsonl") if "lower_drift" in r]


@pytest.fixture(scope="module")
def megatron_run(small_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("megatron") / "run"
    run_ranks(_megatron, 2, _overrides(small_dataset, run))
    return run


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_the_megatron_path(small_dataset, megatron_run, tmp_path, stage) -> None:
    import json

    from slowqk import monitor

    summaries = run_ranks(_deepspeed, 2, _overrides(small_dataset, tmp_path / "ds"), stage)
    ref, got = _losses(megatron_run), _losses(tmp_path / "ds")
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in ref:  # same model, data, schedule and Q/K intervention; only the engine differs
        assert got[step] == pytest.approx(ref[step], rel=2e-5), (stage, step, got[step], ref[step])
    release = json.loads((megatron_run / "summary.json").read_text())["qk_release"]
    assert (release["reason"], release["step"]) == ("settled", 4), release
    assert summaries[0]["qk_release"]["step"] == release["step"]
    assert _drift(tmp_path / "ds") == pytest.approx(_drift(megatron_run), rel=1e-4)
    ref_diag, got_diag = _diagnostics(megatron_run), _diagnostics(tmp_path / "ds")
    assert [d["step"] for d in got_diag] == [d["step"] for d in ref_diag] == [1, 3, 5]
    for r, g in zip(ref_diag, got_diag, strict=True):
        assert g.keys() == r.keys() and g["layers"].keys() == r["layers"].keys()
        for layer, want in r["layers"].items():
            have = g["layers"][layer]
            assert have.keys() == want.keys(), (layer, have.keys() ^ want.keys())
            for key in monitor.SCALARS:  # the same measurement through another engine
                if key in want:
                    assert have[key] == pytest.approx(want[key], rel=2e-3, abs=1e-7), (
                        key,
                        g["step"],
                    )
    warning = json.loads((megatron_run / "summary.json").read_text())["specialization_warning"]
    assert summaries[0]["specialization_warning"] == warning


def _rows_worker(rank: int, world: int, stage: int, mult_q: float, mult_k: float) -> dict:
    """One ZeRO step on a fixed batch with the groups of the megatron row test or without."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from megatron_harness import VOCAB, tiny_recipe
    from test_lr_group_rows import LAYERS, groups_config

    from slowqk.distributed import init_distributed
    from slowqk.engines.deepspeed import deepspeed_config, param_groups
    from slowqk.models import build_gpt_model, build_transformer_config
    from slowqk.optim import build_lr_groups

    recipe = tiny_recipe(
        model={"num_query_groups": 2},
        train={"micro_batch_size": 2, "global_batch_size": 2 * world},
        qk={
            "enabled": True,
            "layers": {"indices": LAYERS},
            "unit": "steps",
            "hold": 8,
            "ramp": 0,
            "mult_q": mult_q,
            "mult_k": mult_k,
        },
        lr_groups=groups_config(),
    )
    out = {}
    for name, patched in (("patched", True), ("plain", False)):
        init_distributed(
            recipe.parallel, recipe.seed
        )  # same seed: the same initial weights both times
        model = build_gpt_model(recipe.model, build_transformer_config(recipe.model), VOCAB)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, eps=1e-3)
        engine, ds_opt, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=deepspeed_config(recipe, world, stage)
        )
        if patched:
            build_lr_groups(recipe, ds_opt, [model]).set_step(0)
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7 + rank))
        pos = torch.arange(16).expand_as(ids)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = engine(ids, pos, None, labels=ids).float().mean()
        engine.backward(loss)
        engine.step()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            out[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
        out["before"] = before
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_scales_exactly_the_groups_elements(stage) -> None:
    from test_lr_group_rows import MULT_K, MULT_Q, ROW_GROUPS, scaled_row_updates

    res = run_ranks(_rows_worker, 2, stage, MULT_Q, MULT_K)[0]
    moved = set()
    for name, label, mult, d_p, d_u in scaled_row_updates(
        res["before"], res["patched"], res["plain"]
    ):
        if d_u.abs().max() == 0:  # e.g. the K bias: softmax ignores a per-query constant
            continue
        # relative to the update's size, or one fp32 ulp of the weights it was added to (norm
        # weights near 1.0): the only difference left is fp32 rounding of the weights
        ulp = torch.finfo(torch.float32).eps * res["before"][name].abs().max().item()
        err = (d_p - mult * d_u).abs().max().item()
        assert err < max(1e-5 * d_u.abs().max().item(), ulp), (name, mult, err)
        moved.add(label)
    assert moved == {"q", "k"} | {f"group{i}" for i in range(len(ROW_GROUPS))}, moved


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel.tensor=2"],
            "key 'parallel.engine': deepspeed runs at parallel.tensor=1, parallel.pipeline=1",
        ),
        (
            ["optimizer.name=sgd"],
            "key 'optimizer.name': got 'sgd'; the DeepSpeed engine is wired for adamw",
        ),
    ],
)
def test_unsupported_combinations_are_refused_when_the_recipe_loads(overrides, message) -> None:
    from slowqk.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_recipe("tiny/gpt", ["parallel.engine=deepspeed", *overrides])


def test_init_from_starts_zero3_from_a_megatron_checkpoint(
    small_dataset, megatron_run, tmp_path
) -> None:
    """``train.init_from`` on the DeepSpeed engine: the weights of a megatron-core checkpoint,
    loaded before ZeRO-3 partitions them; the first loss equals the megatron engine's from the
    same checkpoint."""
    source = tmp_path / "source"
    run_ranks(_megatron, 2, _overrides(small_dataset, source, **{"train.save_interval": 3}))
    init = {"train.init_from": str(source), "train.steps": 1, "train.eval_interval": 1}
    run_ranks(_megatron, 2, _overrides(small_dataset, tmp_path / "mc", **init))
    run_ranks(_deepspeed, 2, _overrides(small_dataset, tmp_path / "ds", **init), 3)
    fresh, mc, ds = (_losses(r)[1] for r in (megatron_run, tmp_path / "mc", tmp_path / "ds"))
    assert ds == pytest.approx(mc, rel=2e-5)
    assert abs(ds - fresh) > 0.1  # trained weights, not a fresh initialization
