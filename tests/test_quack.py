"""QuacK as a learning-rate-group rule (``lr_groups: [{rule: quack, params: [q, k], mult: tau}]``).

Checked against an independent plain-PyTorch model whose every Q and K head is a parameter of its
own in a torch AdamW param group of its own, with the lr of each group set before every step from
the heads' Frobenius norms, computed here from the paper's formula (not from slowqk's code):
Q head h of group g at ``lr * tau * |K_g|_0 / |K_g|``, K head g at
``lr * tau * max_h |Q_h|_0 / max_h |Q_h|``. The megatron-core side runs the real GPTModel,
optimizer and pipeline schedule in gloo ranks (the harness of ``test_lr_group_exactness``); its
distributed optimizer is compared with its FP32 optimizer on the same weights and data, as the
other groups are; DeepSpeed ZeRO 1-2 step by step against the multipliers computed from the
weights; a run resumes bitwise and across a change of layout.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from multiproc import run_ranks

TAU = 0.5
STEPS_ZERO = 3
QUACK = [{"name": "quack", "rule": "quack", "params": ["q", "k"], "mult": TAU}]


def _quack(layers: dict | None = None) -> list[dict]:
    return [dict(QUACK[0], **({"layers": layers} if layers else {}))]


# ------------------------------------------------------------------ the formula, by hand


def test_head_norms_are_each_heads_rows_in_megatrons_layout() -> None:
    from slowqk.qk.quack import head_norms

    groups, per_group, hd, h = 2, 3, 4, 5
    w = torch.randn(groups * (per_group + 2) * hd, h)
    q, k = head_norms(w, groups, per_group, hd)
    for g in range(groups):
        base = g * (per_group + 2) * hd
        for j in range(per_group):
            assert torch.isclose(q[g, j], w[base + j * hd : base + (j + 1) * hd].norm())
        k_rows = w[base + per_group * hd : base + (per_group + 1) * hd]
        assert torch.isclose(k[g], k_rows.norm())


def test_multipliers_start_at_tau_and_follow_the_other_projections_norm() -> None:
    from slowqk.qk.quack import multipliers

    q0, k0 = torch.tensor([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([1.0, 4.0])
    mq, mk = multipliers(q0, k0, q0, k0, 0.3)
    assert torch.allclose(mq, torch.full((2, 2), 0.3)) and torch.allclose(mk, torch.full((2,), 0.3))
    # group 0's K doubled: its two Q heads at half; group 1's largest Q head tripled: its K at 1/3
    mq, mk = multipliers(
        torch.tensor([[1.0, 2.0], [3.0, 1.0]]), torch.tensor([2.0, 4.0]), q0, k0, 1
    )
    assert mq.tolist() == [[0.5, 0.5], [1.0, 1.0]]
    assert mk[0].item() == 1.0 and math.isclose(mk[1].item(), 1 / 3, rel_tol=1e-6)


def test_heads_split_over_tensor_ranks_by_whole_query_groups() -> None:
    from slowqk.lr_groups.rows import FusedQKVLayout

    layout = FusedQKVLayout(num_query_groups=4, heads_per_group=2, head_dim=8)
    q = [layout.head_rows("q", r, 2) for r in (0, 1)]
    k = [layout.head_rows("k", r, 2) for r in (0, 1)]
    assert [key for key, _ in q[1]] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert [rows for key, rows in k[1]] == layout.local_rows("k", 1, 2)
    # all Q rows exactly once, as local_rows has them
    for r in (0, 1):
        got = sorted(row for _, (a, b) in q[r] for row in range(a, b))
        want = sorted(row for a, b in layout.local_rows("q", r, 2) for row in range(a, b))
        assert got == want


@pytest.mark.parametrize(
    "entry, extra, message",
    [
        ({"params": ["q"]}, [], "rule=quack needs params [q, k]"),
        ({"hold": 0.1}, [], "rule=quack has no hold or ramp"),
        (
            {},
            ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
            "which ZeRO-3 partitions",
        ),
    ],
)
def test_bad_quack_groups_are_refused(entry: dict, extra: list[str], message: str) -> None:
    from slowqk.config import RecipeError, load_recipe

    group = json.dumps([dict(QUACK[0], **entry)])
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe("tiny/gpt", [f"lr_groups={group}", *extra])


# ------------------------------------------------------------------ against the reference


def _head_lrs(ref, layers: set[int], start: dict) -> dict[tuple, float]:
    """Each head's multiplier by the paper's formula, from the reference's own parameters."""
    out = {}
    for layer, blk in enumerate(ref.blocks):
        if layer not in layers:
            continue
        per_group = blk.nh // blk.ng
        qn = [p.detach().norm().item() for p in blk.q.heads]
        kn = [p.detach().norm().item() for p in blk.k.heads]
        start.setdefault(layer, (qn, kn))
        q0, k0 = start[layer]
        for g in range(blk.ng):
            heads = range(g * per_group, (g + 1) * per_group)
            for h in heads:
                out[("q", layer, h)] = TAU * k0[g] / kn[g]
            out[("k", layer, g)] = TAU * max(q0[h] for h in heads) / max(qn[h] for h in heads)
    return out


def _head_param_groups(ref, layers: set[int], lr: float, wd: float) -> list[dict]:
    """A torch param group per Q/K head (weight and bias apart, for weight decay) of ``layers``,
    the rest in base groups."""
    out: dict[tuple, dict] = {}
    for name, p in ref.named_parameters():
        decay = wd if p.ndim > 1 and "bias" not in name else 0.0
        parts = name.split(".")
        head = None
        if parts[0] == "blocks" and parts[2] in ("q", "k") and int(parts[1]) in layers:
            head = (parts[2], int(parts[1]), int(parts[-1]))
        key = (head, decay)
        out.setdefault(key, {"params": [], "head": head, "weight_decay": decay, "lr": lr})
        out[key]["params"].append(p)
    return list(out.values())


def _reference_worker(rank: int, world: int, case: dict) -> dict:
    from megatron.core import parallel_state
    from megatron_harness import VOCAB, build_stack, gather_full_state, train_step
    from reference_model import ReferenceGPT
    from test_lr_group_exactness import _batches, _recipe, _relative_diffs

    from slowqk.config import resolve_layers
    from slowqk.distributed import shutdown
    from slowqk.optim import head_multiplier_range

    recipe = _recipe(case, distopt=False)
    mc, o = recipe.model, recipe.optimizer
    model, chunks, opt, sched, groups = build_stack(recipe, float64=True)
    gated = mc.ffn == "swiglu"
    ref = ReferenceGPT(mc, VOCAB, split_qk_heads=True).to(torch.float64)
    ref.load_megatron(gather_full_state(model, gated))
    layers = set(resolve_layers(recipe.lr_groups[0].layers, mc.num_layers))
    ref_opt = torch.optim.AdamW(
        _head_param_groups(ref, layers, o.lr, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mb, start, spread = recipe.train.micro_batch_size, {}, []
    for step, global_ids in _batches(dp_size, mb, mc.seq_length):
        base_lr = opt.param_groups[0]["lr"]
        mults = _head_lrs(ref, layers, start)
        for group in ref_opt.param_groups:
            group["lr"] = base_lr * (mults[group["head"]] if group["head"] else 1.0)
        ref_opt.zero_grad()
        ref.loss(global_ids[:, :-1], global_ids[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), o.clip_grad)
        ref_opt.step()
        train_step(chunks, opt, sched, groups, step, global_ids[dp_rank * mb : (dp_rank + 1) * mb])
        spread.append(head_multiplier_range(groups, torch.device("cpu")))
    after = ReferenceGPT(mc, VOCAB, split_qk_heads=True).to(torch.float64)
    after.load_megatron(gather_full_state(model, gated))
    result = {
        "worst": _relative_diffs(ref, after, mc.init_method_std),
        "held": groups.num_elements("quack"),
        "first": spread[0],
        "last": spread[-1],
        "ref_last": {
            f"quack.{kind}_{end}": fn(v for key, v in mults.items() if key[0] == kind)
            for kind in "qk"
            for end, fn in (("min", min), ("max", max))
        },
    }
    shutdown()
    return result


LLAMA = {
    "num_query_groups": 2,
    "ffn": "swiglu",
    "norm": "rmsnorm",
    "bias": False,
    "position": "rope",
}
REFERENCE_CASES = {
    "mha-tp1": dict(tp=1, world=1, optimizer="adamw", groups=_quack(), model={}),
    "gqa-llama-tp2": dict(
        tp=2,
        world=2,
        optimizer="adamw",
        groups=_quack({"top": 2}),
        model=dict(LLAMA, num_attention_heads=8, num_query_groups=2),
    ),
    "gqa-pp2": dict(
        tp=1,
        pp=2,
        world=2,
        optimizer="adamw",
        groups=_quack({"indices": [0, 3]}),
        model={"num_query_groups": 2},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_quack_matches_per_head_param_groups(name: str) -> None:
    from test_lr_group_exactness import _assert_within_1e6

    case = REFERENCE_CASES[name]
    results = run_ranks(_reference_worker, case["world"], case)
    _assert_within_1e6(results, "the per-head reference")
    assert sum(r["held"] for r in results) > 0
    # the multipliers start at tau on every head and have moved apart by the end (the rule acts;
    # a constant tau would differ from the reference by O(lr), far above the tolerance)
    first = results[0]["first"]
    assert all(math.isclose(v, TAU, rel_tol=1e-6) for v in first.values()), first
    last = results[0]["last"]
    assert last["quack.q_max"] - last["quack.q_min"] > 0.01 * TAU, last
    # the range slowqk logs for the last step is the reference's, over all heads and ranks
    assert last == pytest.approx(results[0]["ref_last"], rel=1e-6)


@pytest.mark.slow
def test_quack_in_the_distributed_optimizer_matches_the_fp32_optimizer() -> None:
    """DP2: main params sharded over two ranks; at this size the boundary falls at row 70 of
    layer 1's QKV weight, inside group 1's first Q head (rows 64-79)."""
    from test_lr_group_exactness import _assert_within_1e6, _distopt_worker

    case = dict(
        tp=1,
        world=2,
        optimizer="adamw",
        eps=1e-3,
        steps=8,
        groups=_quack(),
        model={
            "num_query_groups": 2,
            "num_layers": 3,
            "tie_embeddings": False,
            "ffn_hidden_size": 32,
        },
    )
    results = run_ranks(_distopt_worker, 2, case)
    assert all(r["opt"] == "DistributedOptimizer" for r in results)
    _assert_within_1e6(results, "the FP32 optimizer")
    assert sum(r["scaled"]["quack"] for r in results) == results[0]["scaled_full"]["quack"] > 0
    assert "quack" in set().union(*(r["cut_groups"] for r in results))


# ------------------------------------------------------------------ DeepSpeed


def _copy_task(vocab: int, seed: int) -> torch.Tensor:
    """Two sequences of 17 tokens whose second half repeats the first: attention has something
    to find, so Q/K gradients (and the heads' norms) move, unlike on uniform noise."""
    half = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))
    return torch.cat([half, half[:, :8]], dim=1)


def _zero_worker(rank: int, world: int, stage: int) -> dict:
    """ZeRO steps with QuacK beside the per-head reference on the global batch."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    from megatron_harness import VOCAB, gather_full_state, tiny_recipe
    from reference_model import ReferenceGPT
    from test_lr_group_exactness import _relative_diffs

    from slowqk.distributed import init_distributed
    from slowqk.engines.deepspeed import deepspeed_config, param_groups
    from slowqk.models import build_gpt_model, build_transformer_config
    from slowqk.optim import build_lr_groups

    recipe = tiny_recipe(
        model={"num_query_groups": 2},
        train={"micro_batch_size": 2, "global_batch_size": 2 * world},
        lr_groups=_quack({"top": 2}),
    )
    lr, wd, eps, mc = 1e-2, 0.1, 1e-6, recipe.model
    init_distributed(recipe.parallel, recipe.seed)
    model = build_gpt_model(mc, build_transformer_config(mc), VOCAB)
    layers = {2, 3}
    # the reference, and a control at the constant tau (what a wrong rule would come close to)
    refs = [ReferenceGPT(mc, VOCAB, split_qk_heads=True) for _ in range(2)]
    opts = []
    for ref in refs:
        ref.load_megatron(gather_full_state(model, False))
        opts.append(torch.optim.AdamW(_head_param_groups(ref, layers, lr, wd), lr=lr, eps=eps))
    opt = torch.optim.AdamW(param_groups(model, wd), lr=lr, eps=eps)
    engine, ds_opt, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=deepspeed_config(recipe, world, stage)
    )
    groups = build_lr_groups(recipe, ds_opt, [model])
    start, worst_mult, held = {}, 0.0, set()
    for step in range(STEPS_ZERO):
        groups.set_step(step)
        batch = [_copy_task(VOCAB, 7 + r + 10 * step) for r in range(world)]
        x, y = batch[rank][:, :-1], batch[rank][:, 1:]
        loss = engine(x, torch.arange(16).expand_as(x), None, labels=y).float().mean()
        engine.backward(loss)
        engine.step()
        mults = _head_lrs(refs[0], layers, start)
        per_group = mc.num_attention_heads // mc.num_query_groups
        used = {  # slowqk's multipliers of this step, under the reference's head numbering
            (kind, layer, group * per_group + head if kind == "q" else group): m
            for (kind, layer, group, head), m in groups.head_mults["quack"].items()
        }
        # a rank's partition may hold no head at all
        worst_mult = max([worst_mult, *(abs(used[k] / mults[k] - 1) for k in used)])
        held |= set(used)
        everything = torch.cat(batch)
        for ref, ref_opt, rule in zip(refs, opts, (mults, dict.fromkeys(mults, TAU)), strict=True):
            for group in ref_opt.param_groups:
                group["lr"] = lr * (rule[group["head"]] if group["head"] else 1.0)
            ref_opt.zero_grad()
            ref.loss(everything[:, :-1], everything[:, 1:]).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), recipe.optimizer.clip_grad)
            ref_opt.step()
    after = ReferenceGPT(mc, VOCAB, split_qk_heads=True)
    after.load_megatron(gather_full_state(model, False))
    return {
        "worst": _relative_diffs(refs[0], after, mc.init_method_std),
        "constant_tau": max(_relative_diffs(refs[1], after, mc.init_method_std).values()),
        "worst_mult": worst_mult,
        "held": held,
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_quack_matches_per_head_param_groups(stage: int) -> None:
    """ZeRO's fp32 partitions, cut anywhere in the heads' rows, against the per-head reference.
    fp32 on both sides: Adam at eps 1e-8 turns the two sides' rounding into percent-level
    differences within 8 steps, at eps 1e-3 the Q/K updates are too small for the norms to move;
    eps 1e-6 over 3 steps (measured): the rule's reference within 1.8e-4 of the init scale, the
    control (the same reference with every head at the constant tau) 1.1e-2 away."""
    results = run_ranks(_zero_worker, 2, stage)
    for r, res in enumerate(results):
        bad = {k: f"{v:.2e}" for k, v in res["worst"].items() if v > 1e-3}
        assert not bad, f"rank {r}: params differ from the per-head reference: {bad}"
    # the control at a constant tau is far outside the tolerance: the test sees the rule
    assert all(res["constant_tau"] > 5e-3 for res in results), results[0]["constant_tau"]
    # every step's multipliers are the reference's, for every head a rank's partition holds (the
    # weight's param group and the biases' are stepped apart: norms taken once per step)
    assert all(res["worst_mult"] < 1e-5 for res in results), [r["worst_mult"] for r in results]
    assert set().union(*(r["held"] for r in results)) == {
        (kind, layer, h) for layer in (2, 3) for kind, n in (("q", 4), ("k", 2)) for h in range(n)
    }


# ------------------------------------------------------------------ through the trainer


def _train_worker(rank: int, world: int, overrides: list[str], allow_change: bool = False) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    return train(load_recipe("tiny/gpt", overrides), quiet=True, allow_recipe_change=allow_change)


def _run_overrides(dataset: str, out, **extra) -> list[str]:
    from conftest import small_run_overrides

    return small_run_overrides(
        dataset,
        out,
        **{
            "qk.enabled": "false",
            "qk.unit": "fraction",
            "qk.ramp": 0.01,
            "qk.release": "fixed",
            "model.num_layers": 4,
            "model.num_query_groups": 2,
            "train.save_interval": 2,
            "train.keep_last": 5,
            "parallel.distributed_optimizer": "true",
            "lr_groups": json.dumps(_quack({"top": 2})),
            **extra,
        },
    )


def _records(run) -> dict[int, dict]:
    from slowqk.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}


@pytest.mark.slow
def test_quack_resumes_bitwise_and_across_a_layout_change(small_dataset, tmp_path) -> None:
    """DP2 with the distributed optimizer, 6 steps from the weights of an earlier run
    (``train.init_from``); resumed from its step-2 checkpoint: the same losses and multipliers,
    bitwise. A resume does not load init_from, so only the start norms the checkpoint keeps give
    these multipliers. Resumed at PP2 instead: each stage finds its heads' start norms under their
    global keys. QuacK added to a run on resume starts at tau from the resumed weights."""
    import shutil

    from slowqk.checkpoint import read_extra

    base = tmp_path / "base"  # without QuacK
    run_ranks(_train_worker, 2, _run_overrides(small_dataset, base, lr_groups="[]"))
    init = {"train.init_from": str(base / "checkpoints")}
    full = tmp_path / "full"
    summary = run_ranks(_train_worker, 2, _run_overrides(small_dataset, full, **init))[0]
    assert summary["lr_groups"][0]["rule"] == "quack"
    ref = _records(full)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    first, last = ref[1]["lr_mult"], ref[6]["lr_mult"]
    assert first["quack.q_min"] == pytest.approx(TAU, rel=1e-6), first  # tau at the start
    assert max(abs(v - TAU) for v in last.values()) > 1e-3, last  # the norms moved
    saved = read_extra(full / "checkpoints" / "iter_0000002")["callbacks"]["qk_scaling"]
    # every head of both layers (2 groups x 2 Q heads + 2 K heads, layers 2 and 3)
    assert len(saved["quack"]["quack"]["start_norms"]) == 2 * (4 + 2)

    for name, source, extra in (
        ("resumed", full, {}),
        ("pp2", full, {"parallel.pipeline": 2}),
        ("added", base, {}),
    ):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(
            source / "checkpoints" / "iter_0000002", run / "checkpoints" / "iter_0000002"
        )
        (run / "checkpoints" / "latest").write_text("iter_0000002\n")
        overrides = _run_overrides(small_dataset, run, **init, **extra)
        assert run_ranks(_train_worker, 2, overrides, name == "added")[0]["resumed"]
        got = _records(run)
        assert sorted(got) == [3, 4, 5, 6]
        if name == "added":
            assert got[3]["lr_mult"] == pytest.approx(dict.fromkeys(first, TAU), rel=1e-6)
            continue
        for step, rec in got.items():
            if name == "resumed":
                assert (rec["loss"], rec["lr_mult"]) == (ref[step]["loss"], ref[step]["lr_mult"])
            else:
                assert rec["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
                for key, value in rec["lr_mult"].items():
                    assert value == pytest.approx(ref[step]["lr_mult"][key], rel=1e-5), key
