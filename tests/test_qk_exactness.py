"""The Q/K patch inside megatron-core's optimizers equals separate Q/K/V param groups with lr*mult.

Reference cases run the real megatron-core GPTModel + DDP + FP32 optimizer in spawned gloo ranks
and, on every rank, an independent plain-PyTorch model whose Q, K, V are separate parameters, Q and
K of the selected layers in param groups whose lr is ``lr * mult(step)``.

SGD runs in fp32. Adam runs in float64 on both sides: Adam divides by sqrt(v)+eps, which turns
fp32 rounding differences of small gradients (two independent models never round alike) into
update differences of up to lr*dg/(|g|+eps); float64 takes that noise out of the comparison.

megatron-core's distributed optimizer casts grads to fp32 and supports Adam only, so its cases
compare it (with the patch, main params sharded over DP) against the FP32-optimizer path above on
the same weights and data; the FP32 path is the one checked against the independent reference.
Even without the patch the two megatron-core optimizers differ in the last bits of the grad-norm
reduction, which Adam at eps=1e-8 amplifies (up to 1e-3 relative on the zero-gradient K bias,
measured); these cases use eps=1e-3 so the update is nearly linear in the gradient. A wrong Q/K
element selection would still differ by O(lr), some 1e5 times the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks

STEPS = 5
# hold 2 steps, ramp 2 steps: covers the hold, the ramp and the released phase.
QK = {"enabled": True, "unit": "steps", "hold": 2, "ramp": 2, "mult_q": 0.25, "mult_k": 0.5}
LLAMA = {"num_query_groups": 2, "ffn": "swiglu", "norm": "rmsnorm", "bias": False, "position": "rope"}


def _recipe(case: dict, distopt: bool, qk: bool = True):
    from megatron_harness import tiny_recipe

    return tiny_recipe(
        model=case.get("model", {}),
        parallel={"tensor": case["tp"], "distributed_optimizer": distopt},
        optimizer={"name": case["optimizer"], "schedule": "cosine", "eps": case.get("eps", 1e-8)},
        qk=dict(QK, layers=case["layers"], enabled=qk),
        train={"steps": STEPS},
    )


def _batches(dp_size: int, mb: int, seq: int):
    from megatron_harness import VOCAB

    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 + step)
        yield step, torch.randint(0, VOCAB, (dp_size * mb, seq + 1), generator=g)


def _relative_diffs(ref, after, floor: float) -> dict[str, float]:
    # Relative to the tensor's scale, floored at the init std: the K bias has an exactly zero
    # gradient (softmax ignores a per-query constant), so its values are rounding noise only.
    out = {}
    for (name, p_ref), (_, p_other) in zip(ref.named_parameters(), after.named_parameters(), strict=True):
        scale = max(p_ref.abs().max().item(), floor)
        out[name] = (p_ref - p_other).abs().max().item() / scale
    return out


def _reference_worker(rank: int, world: int, case: dict) -> dict:
    from megatron.core import parallel_state
    from megatron_harness import VOCAB, build_stack, gather_full_state, train_step
    from reference_model import ReferenceGPT

    from slowqk.distributed import shutdown

    recipe = _recipe(case, distopt=False)
    float64 = case["optimizer"] != "sgd"
    dtype = torch.float64 if float64 else torch.float32
    model, chunks, opt, sched, qk = build_stack(recipe, float64=float64)
    mc, o = recipe.model, recipe.optimizer
    gated = mc.ffn == "swiglu"
    ref = ReferenceGPT(mc, VOCAB).to(dtype)
    ref.load_megatron(gather_full_state(model, gated))
    groups = ref.param_groups(o.lr, o.weight_decay, set(qk.layers))
    if o.name == "sgd":
        ref_opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.sgd_momentum)
    elif o.name == "adam":  # L2-coupled weight decay, as megatron-core's non-decoupled Adam
        ref_opt = torch.optim.Adam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    else:
        ref_opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mb = recipe.train.micro_batch_size
    for step, global_ids in _batches(dp_size, mb, mc.seq_length):
        base_lr = opt.param_groups[0]["lr"]
        mult = {"q": qk.schedule_q(step), "k": qk.schedule_k(step), "base": 1.0}
        for group in ref_opt.param_groups:
            group["lr"] = base_lr * mult[group["kind"]]
        ref_opt.zero_grad()
        ref.loss(global_ids[:, :-1], global_ids[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), o.clip_grad)
        ref_opt.step()
        train_step(chunks, opt, sched, qk, step, global_ids[dp_rank * mb : (dp_rank + 1) * mb])

    after = ReferenceGPT(mc, VOCAB).to(dtype)
    after.load_megatron(gather_full_state(model, gated))
    result = {"worst": _relative_diffs(ref, after, mc.init_method_std), "scaled": qk.num_scaled_elements}
    shutdown()
    return result


def _distopt_worker(rank: int, world: int, case: dict) -> dict:
    from megatron.core import parallel_state
    from megatron_harness import build_stack, gather_full_state, train_step
    from reference_model import ReferenceGPT

    from slowqk.distributed import shutdown

    stacks = {}
    for distopt in (False, True):
        recipe = _recipe(case, distopt)
        init_from = stacks[False][0] if distopt else None
        stacks[distopt] = build_stack(recipe, init_from=init_from)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mb, mc = recipe.train.micro_batch_size, recipe.model
    for step, global_ids in _batches(dp_size, mb, mc.seq_length):
        for _model, chunks, opt, sched, qk in stacks.values():
            train_step(chunks, opt, sched, qk, step, global_ids[dp_rank * mb : (dp_rank + 1) * mb])
    models = {}
    for distopt, (model, *_rest) in stacks.items():
        models[distopt] = ReferenceGPT(mc, 256)
        models[distopt].load_megatron(gather_full_state(model, mc.ffn == "swiglu"))
    result = {
        "worst": _relative_diffs(models[False], models[True], mc.init_method_std),
        "scaled": stacks[True][4].num_scaled_elements,
        "scaled_full": stacks[False][4].num_scaled_elements,
        "opt": type(stacks[True][2].chained_optimizers[0]).__name__,
    }
    shutdown()
    return result


REFERENCE_CASES = {
    "mha-tp1-adamw": dict(tp=1, world=1, optimizer="adamw", layers={"top": 2}),
    "gqa-llama-tp1-sgd-skip": dict(tp=1, world=1, optimizer="sgd", layers={"indices": [1, 3]}, model=LLAMA),
    "mha-tp2-adamw": dict(tp=2, world=2, optimizer="adamw", layers={"top_fraction": 0.5}),
    "gqa-tp2-sgd-skip": dict(tp=2, world=2, optimizer="sgd", layers={"indices": [0, 2]}, model={"num_query_groups": 2}),
    "gqa-llama-tp2-adamw": dict(tp=2, world=2, optimizer="adamw", layers={"top": 2}, model=LLAMA),
}

DISTOPT_CASES = {
    "mha-tp1-dp1": dict(tp=1, world=1, optimizer="adamw", eps=1e-3, layers={"top": 2}),
    "gqa-llama-tp2-dp1": dict(tp=2, world=2, optimizer="adamw", eps=1e-3, layers={"indices": [1, 3]}, model=LLAMA),
    # DP=2: main params are sharded over two ranks; Q/K ranges of several layers cross the boundary.
    "gqa-tp1-dp2-skip": dict(tp=1, world=2, optimizer="adamw", eps=1e-3, layers={"indices": [0, 1, 3]}, model={"num_query_groups": 2}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_patch_matches_separate_qkv_reference(name: str) -> None:
    case = REFERENCE_CASES[name]
    results = run_ranks(_reference_worker, case["world"], case)
    for r, res in enumerate(results):
        bad = {k: f"{v:.2e}" for k, v in res["worst"].items() if v > 1e-6}
        assert not bad, f"rank {r}: params differ from the separate-Q/K/V reference: {bad}"
        assert res["scaled"][0] > 0 and res["scaled"][1] > 0  # the patch did hold Q and K elements


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DISTOPT_CASES))
def test_distributed_optimizer_matches_fp32_optimizer(name: str) -> None:
    case = DISTOPT_CASES[name]
    results = run_ranks(_distopt_worker, case["world"], case)
    for r, res in enumerate(results):
        assert res["opt"] == "DistributedOptimizer"
        bad = {k: f"{v:.2e}" for k, v in res["worst"].items() if v > 1e-6}
        assert not bad, f"rank {r}: distributed optimizer differs from the FP32 optimizer: {bad}"
    # sharding: the ranks' Q/K element counts add up to the unsharded count
    q_sum = sum(res["scaled"][0] for res in results)
    k_sum = sum(res["scaled"][1] for res in results)
    dp = case["world"] // case["tp"]
    assert (q_sum, k_sum) == tuple(dp * x for x in (0, 0)) or (q_sum, k_sum) == tuple(
        sum(res["scaled_full"][i] for res in results) // dp for i in (0, 1)
    )
    if dp > 1:  # every DP rank holds part of the selected Q/K rows
        assert all(res["scaled"][0] > 0 and res["scaled"][1] > 0 for res in results)
