"""Only the selected layers' Q and K rows move at the reduced rate; everything else is untouched.

One optimizer step from identical weights and data, with and without the patch: every element
outside the selected Q/K rows is bitwise equal, and the selected rows moved by exactly
``mult`` times the unpatched update (to fp32 rounding). With ``mult == 1`` the whole model is
bitwise equal to the unpatched run over several steps.
"""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks

LAYERS = [1, 3]
MULT_Q, MULT_K = 0.25, 0.5


def _worker(
    rank: int, world: int, distopt: bool, mult_q: float, mult_k: float, steps: int, precision: str = "fp32"
) -> dict:
    from megatron.core import parallel_state
    from megatron_harness import VOCAB, build_stack, tiny_recipe, train_step

    from slowqk.distributed import shutdown

    def recipe(enabled: bool):
        return tiny_recipe(
            model={"num_query_groups": 2},
            parallel={"distributed_optimizer": distopt},
            train={"precision": precision},
            qk={"enabled": enabled, "layers": {"indices": LAYERS}, "unit": "steps", "hold": 8,
                "ramp": 0, "mult_q": mult_q, "mult_k": mult_k},
        )

    patched = build_stack(recipe(True))
    plain = build_stack(recipe(False), with_qk=False, init_from=patched[0])
    before = _main_params(patched[2], patched[1][0])
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (2 * dp, 17), generator=torch.Generator().manual_seed(step))
        for _model, chunks, opt, sched, qk in (patched, plain):
            train_step(chunks, opt, sched, qk, step, ids[2 * dp_rank : 2 * dp_rank + 2])
    out = {
        "before": before,
        "patched": _main_params(patched[2], patched[1][0]),
        "plain": _main_params(plain[2], plain[1][0]),
    }
    shutdown()
    return out


def _main_params(optimizer, ddp_model) -> dict[str, torch.Tensor]:
    """Full fp32 main params by name: the values the optimizer updates (gathered over DP)."""
    import torch.distributed as dist
    from slowqk.patches.qk_lr_scaling import iter_main_params

    held = {id(mp): (main, lo, hi) for _inner, mp, main, lo, hi in iter_main_params(optimizer)}
    out = {}
    for name, p in ddp_model.module.named_parameters():  # same order on every rank
        full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        if id(p) in held:
            main, lo, hi = held[id(p)]
            full[lo:hi] = main.detach().float().view(-1)
        dist.all_reduce(full)  # each element is held by exactly one DP rank
        out[name.removeprefix("module.")] = full.view(p.shape).cpu()
    return out


def _qk_row_masks(name: str, shape: torch.Size, heads: int = 4, groups: int = 2, head_dim: int = 16):
    """Boolean masks of the Q rows and K rows of a fused QKV weight/bias (megatron layout)."""
    per_group = heads // groups
    kinds = (["q"] * per_group * head_dim + ["k"] * head_dim + ["v"] * head_dim) * groups
    q = torch.tensor([k == "q" for k in kinds])
    k = torch.tensor([k == "k" for k in kinds])
    if len(shape) == 2:
        q, k = q[:, None].expand(shape), k[:, None].expand(shape)
    return q, k


def scaled_row_updates(before: dict, patched: dict, plain: dict):
    """Check that everything outside the selected layers' Q and K rows (V rows, other layers, other
    parameters) is bitwise equal with and without the patch; yield ``(name, kind, mult, patched
    update, unpatched update)`` for the Q and K rows, for the caller's tolerance."""
    for name in before:
        layer = int(name.split(".")[2]) if name.startswith("decoder.layers.") else None
        if layer in LAYERS and "linear_qkv" in name and "layer_norm" not in name:
            q, k = _qk_row_masks(name, before[name].shape)
            other = ~(q | k)
            assert torch.equal(patched[name][other], plain[name][other]), f"{name}: V rows changed"
            for kind, mask, mult in (("q", q, MULT_Q), ("k", k, MULT_K)):
                yield name, kind, mult, (patched[name] - before[name])[mask], (plain[name] - before[name])[mask]
        else:
            assert torch.equal(patched[name], plain[name]), f"{name} must get exactly the base update"


@pytest.mark.slow
@pytest.mark.parametrize(
    "distopt,world,precision",
    [(False, 1, "fp32"), (True, 2, "fp32"), (False, 1, "bf16"), (True, 2, "bf16")],
    ids=["fp32opt", "distopt-dp2", "bf16-float16opt", "bf16-distopt-dp2"],
)
def test_only_selected_qk_rows_are_scaled(distopt: bool, world: int, precision: str) -> None:
    """bf16 runs exercise the fp32 main params of the mixed-precision optimizers."""
    res = run_ranks(_worker, world, distopt, MULT_Q, MULT_K, 1, precision)[0]
    scaled_any = False
    for name, kind, mult, d_patched, d_plain in scaled_row_updates(res["before"], res["patched"], res["plain"]):
        # updates are read back as (new weight - old weight), each weight rounded to fp32: what is
        # exact is the update up to one unit in the last place of the weights it was added to
        ulp = torch.finfo(torch.float32).eps * res["before"][name].abs().max().item()
        torch.testing.assert_close(d_patched, mult * d_plain, rtol=1e-5, atol=ulp)
        scaled_any = scaled_any or (kind == "q" and bool((d_plain.abs() > 0).any()))
    assert scaled_any


@pytest.mark.slow
def test_mult_one_is_bitwise_identical_to_unpatched() -> None:
    res = run_ranks(_worker, 1, True, 1.0, 1.0, 3)[0]
    for name in res["before"]:
        assert torch.equal(res["patched"][name], res["plain"][name]), name
    assert any(not torch.equal(res["patched"][n], res["before"][n]) for n in res["before"])
