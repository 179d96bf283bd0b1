"""Pure logic of the intervention: multiplier schedules, layer selection, fused-QKV element
blocks."""

from __future__ import annotations

import pytest
import torch

from slowqk.lr_groups.rows import FusedQKVLayout
from slowqk.qk.schedule import MultiplierSchedule, to_steps
from slowqk.qk.selection import select_layers


def test_linear_schedule_holds_then_ramps_to_one() -> None:
    s = MultiplierSchedule(0.25, hold_steps=4, ramp_steps=3, shape="linear")
    values = [s(i) for i in range(9)]
    assert values[:4] == [0.25] * 4
    assert values[4:7] == pytest.approx([0.4375, 0.625, 0.8125])
    assert values[7:] == [1.0, 1.0]
    assert s.end_step == 7


def test_step_and_cosine_shapes() -> None:
    step = MultiplierSchedule(0.1, 2, 5, "step")
    assert [step(i) for i in range(4)] == [0.1, 0.1, 1.0, 1.0]
    cos = MultiplierSchedule(0.0, 0, 3, "cosine")
    vals = [cos(i) for i in range(4)]
    assert vals[0] == pytest.approx(0.5 * (1 - 0.7071067811865476))  # t = 1/4
    assert all(a < b for a, b in zip(vals, vals[1:], strict=False)) and vals[-1] == 1.0


def test_units_convert_to_steps() -> None:
    assert to_steps(0.04, "fraction", 1000, 4096) == 40
    assert to_steps(12, "steps", 1000, 4096) == 12
    assert to_steps(10_000, "tokens", 1000, 4096) == 2  # 2.44 steps' worth -> nearest
    assert to_steps(0.04, "fraction", 300, 1) == 12  # 12.000000000000002 in floats


@pytest.mark.parametrize("exact", [5.48, 1.37, 2.5, 3.5, 0.5, 7.0, 6.4999])
def test_fraction_and_tokens_round_alike(exact: float) -> None:
    """One convention for both units: nearest step, halves up (137 steps x 0.04 = 5.48 -> 5)."""
    expected = int(exact + 0.5)
    assert to_steps(exact / 1000, "fraction", 1000, 1) == expected
    assert to_steps(exact * 64, "tokens", 10, 64) == expected
    with pytest.raises(ValueError, match="whole number"):
        to_steps(1.5, "steps", 10, 1)


def test_layer_selection() -> None:
    assert select_layers(12, top_fraction=0.5) == list(range(6, 12))  # index >= L/2
    assert select_layers(5, top_fraction=0.5) == [3, 4]
    assert select_layers(4, top=1) == [3]
    assert select_layers(4, indices=[3, 0, 3]) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        select_layers(4, indices=[4])
    with pytest.raises(ValueError, match="exactly one"):
        select_layers(4, top=1, top_fraction=0.5)


def _mask_from_blocks(layout, kind, row_len, tp_rank, tp_size, lo, hi) -> torch.Tensor:
    n = hi - lo
    mask = torch.zeros(n, dtype=torch.bool)
    for b in layout.local_blocks(
        kind, row_len=row_len, tp_rank=tp_rank, tp_size=tp_size, lo=lo, hi=hi
    ):
        for i in range(b.count):
            start = b.offset + i * b.stride
            assert not mask[start : start + b.length].any(), "blocks overlap"
            mask[start : start + b.length] = True
    return mask


def _brute_force_mask(layout, kind, row_len, tp_rank, tp_size, lo, hi) -> torch.Tensor:
    kinds = []
    for _g in range(layout.num_query_groups):
        kinds += (
            ["q"] * layout.heads_per_group * layout.head_dim
            + ["k"] * layout.head_dim
            + ["v"] * layout.head_dim
        )
    rows = len(kinds) // tp_size
    local = kinds[tp_rank * rows : (tp_rank + 1) * rows]
    flat = torch.tensor([k == kind for k in local]).repeat_interleave(row_len)
    return flat[lo:hi]


@pytest.mark.parametrize(
    "groups,heads_per_group,head_dim,tp", [(4, 1, 8, 1), (2, 2, 4, 2), (1, 4, 4, 2), (2, 3, 2, 4)]
)
def test_blocks_match_brute_force(groups, heads_per_group, head_dim, tp) -> None:
    layout = FusedQKVLayout(groups, heads_per_group, head_dim)
    row_len = 3
    local_numel = layout.total_rows // tp * row_len
    g = torch.Generator().manual_seed(0)
    for tp_rank in range(tp):
        ranges = [(0, local_numel)] + [
            tuple(sorted(torch.randint(0, local_numel + 1, (2,), generator=g).tolist()))
            for _ in range(20)
        ]
        for lo, hi in ranges:
            for kind in "qkv":
                got = _mask_from_blocks(layout, kind, row_len, tp_rank, tp, lo, hi)
                want = _brute_force_mask(layout, kind, row_len, tp_rank, tp, lo, hi)
                assert torch.equal(got, want), (kind, tp_rank, lo, hi)


def test_full_range_coalesces_into_one_strided_block_per_kind() -> None:
    layout = FusedQKVLayout(num_query_groups=8, heads_per_group=2, head_dim=16)
    blocks = layout.local_blocks("k", row_len=64)
    assert len(blocks) == 1 and blocks[0].count == 8 and blocks[0].length == 16 * 64
