"""Only the groups' elements move at their rate; everything else is untouched.

One optimizer step from identical weights and data, with and without the groups (the ``qk:``
section's Q/K rows and ``lr_groups`` entries over V rows, O, fc1, fc2, norms, the embedding):
every element outside the groups is bitwise equal, and each group's elements moved by exactly
``mult`` times the unpatched update (to fp32 rounding). The masks here are built from parameter
names and megatron-core's row layout alone. With ``mult == 1`` the whole model is bitwise equal
to the unpatched run over several steps.
"""

from __future__ import annotations

import pytest
import torch
from multiproc import run_ranks

LAYERS = [1, 3]
MULT_Q, MULT_K = 0.25, 0.5
# (params, layers, mult): lr_groups entries beside the Q/K rows of LAYERS
ROW_GROUPS = [
    (["v"], [0, 1], 0.75),
    (["o", "norm"], [2], 0.125),
    (["fc1"], [1], 2.0),
    (["fc2"], [3], 0.3),
    (["embedding"], None, 0.6),
]


def groups_config(scale: float = 1.0) -> list[dict]:
    """ROW_GROUPS as recipe entries, constant multipliers (``scale`` 0 makes them all 1)."""
    return [
        {
            "params": p,
            "mult": 1.0 + scale * (m - 1.0),
            **({"layers": {"indices": ls}} if ls else {}),
        }
        for p, ls, m in ROW_GROUPS
    ]


def _worker(
    rank: int,
    world: int,
    distopt: bool,
    mult_q: float,
    mult_k: float,
    steps: int,
    precision: str = "fp32",
    scale: float = 1.0,
) -> dict:
    from megatron.core import parallel_state
    from megatron_harness import VOCAB, build_stack, tiny_recipe, train_step

    from slowqk.distributed import shutdown

    def recipe(enabled: bool):
        return tiny_recipe(
            model={"num_query_groups": 2},
            parallel={"distributed_optimizer": distopt},
            train={"precision": precision},
            qk={
                "enabled": enabled,
                "layers": {"indices": LAYERS},
                "unit": "steps",
                "hold": 8,
                "ramp": 0,
                "mult_q": mult_q,
                "mult_k": mult_k,
            },
            lr_groups=groups_config(scale) if enabled else [],
        )

    patched = build_stack(recipe(True))
    plain = build_stack(recipe(False), with_groups=False, init_from=patched[0])
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

    from slowqk.lr_groups import iter_main_params

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


def _qk_row_masks(
    name: str, shape: torch.Size, heads: int = 4, groups: int = 2, head_dim: int = 16
):
    """Boolean masks of the Q rows and K rows of a fused QKV weight/bias (megatron layout)."""
    per_group = heads // groups
    kinds = (["q"] * per_group * head_dim + ["k"] * head_dim + ["v"] * head_dim) * groups
    q = torch.tensor([k == "q" for k in kinds])
    k = torch.tensor([k == "k" for k in kinds])
    v = torch.tensor([k == "v" for k in kinds])
    if len(shape) == 2:
        q, k, v = (x[:, None].expand(shape) for x in (q, k, v))
    return q, k, v


def group_masks(name: str, shape: torch.Size) -> dict[str, tuple[float, torch.Tensor]]:
    """``{label: (mult, mask)}`` of the elements of parameter ``name`` in each group (GPT block)."""
    layer = int(name.split(".")[2]) if name.startswith("decoder.layers.") else None
    out = {}
    if "linear_qkv" in name:
        q, k, v = _qk_row_masks(name, shape)
        if layer in LAYERS:
            out.update({"q": (MULT_Q, q), "k": (MULT_K, k)})
    module = {
        "linear_qkv": "v",
        "linear_proj": "o",
        "linear_fc1": "fc1",
        "linear_fc2": "fc2",
        "layernorm": "norm",
        "word_embeddings": "embedding",
        "position_embeddings": "embedding",
    }
    part = next((p for key, p in module.items() if key in name), None)
    for i, (params, layers, mult) in enumerate(ROW_GROUPS):
        if (
            part in params
            and (layers is None or layer in layers)
            and (layer is not None) == (part != "embedding")
        ):
            out[f"group{i}"] = (mult, v if part == "v" else torch.ones(shape, dtype=torch.bool))
    return out


def scaled_row_updates(before: dict, patched: dict, plain: dict):
    """Check that everything outside the groups (other rows, other layers, other parameters) is
    bitwise equal with and without them; yield ``(name, group, mult, patched update, unpatched
    update)`` for each group's elements, for the caller's tolerance."""
    for name in before:
        masks = group_masks(name, before[name].shape)
        outside = torch.ones(before[name].shape, dtype=torch.bool)
        for label, (mult, mask) in masks.items():
            outside &= ~mask
            yield (
                name,
                label,
                mult,
                (patched[name] - before[name])[mask],
                (plain[name] - before[name])[mask],
            )
        assert torch.equal(patched[name][outside], plain[name][outside]), (
            f"{name}: elements outside the groups changed"
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "distopt,world,precision",
    [(False, 1, "fp32"), (True, 2, "fp32"), (False, 1, "bf16"), (True, 2, "bf16")],
    ids=["fp32opt", "distopt-dp2", "bf16-float16opt", "bf16-distopt-dp2"],
)
def test_only_the_groups_elements_move_at_their_rate(
    distopt: bool, world: int, precision: str
) -> None:
    """bf16 runs exercise the fp32 main params of the mixed-precision optimizers."""
    res = run_ranks(_worker, world, distopt, MULT_Q, MULT_K, 1, precision)[0]
    moved = set()
    for name, label, mult, d_patched, d_plain in scaled_row_updates(
        res["before"], res["patched"], res["plain"]
    ):
        # updates are read back as (new weight - old weight), each weight rounded to fp32: what is
        # exact is the update up to one unit in the last place of the weights it was added to
        ulp = torch.finfo(torch.float32).eps * res["before"][name].abs().max().item()
        torch.testing.assert_close(d_patched, mult * d_plain, rtol=1e-5, atol=ulp)
        if bool((d_plain.abs() > 0).any()):
            moved.add(label)
    assert moved == {"q", "k"} | {f"group{i}" for i in range(len(ROW_GROUPS))}, moved


@pytest.mark.slow
def test_mult_one_is_bitwise_identical_to_unpatched() -> None:
    res = run_ranks(_worker, 1, True, 1.0, 1.0, 3, "fp32", 0.0)[0]
    for name in res["before"]:
        assert torch.equal(res["patched"][name], res["plain"][name]), name
    assert any(not torch.equal(res["patched"][n], res["before"][n]) for n in res["before"])
