"""Which elements of a (fused) weight a part names, as row runs and strided blocks (pure logic).

megatron-core stores Q, K, V of a layer as one ``linear_qkv`` weight whose rows are laid out per
query group: ``[q_0 .. q_{h/g-1}, k, v]`` (each ``head_dim`` rows) for every group, and
tensor-parallel rank ``r`` holds the contiguous row chunk ``r`` of ``tp`` chunks. A gated FFN's
``linear_fc1`` is laid out per TP rank instead: rank ``r`` holds ``[gate_r; up_r]``, the ``r``-th
chunk of the gate rows followed by the ``r``-th chunk of the up rows (megatron-core splits gate and
up separately so each rank can apply the gate locally). The distributed optimizer (or a ZeRO
partition) further holds only a flat element range ``[lo, hi)`` of each parameter. ``Block``s
describe the selected elements inside such a range as strided runs, so an update touches them with
a handful of tensor views instead of per-element indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["q", "k", "v"]
RowRuns = list[tuple[int, int]]  # [start, end) row ranges of this rank's shard


@dataclass(frozen=True)
class Block:
    """Elements ``offset + i*stride + j`` for ``i < count``, ``j < length`` of a flat tensor."""

    offset: int
    count: int
    stride: int
    length: int

    @property
    def numel(self) -> int:
        return self.count * self.length

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The block's elements of a flat (1-D, contiguous) tensor as a ``[count, length]`` view."""
        return flat.as_strided(
            (self.count, self.length), (self.stride, 1), flat.storage_offset() + self.offset
        )


@dataclass(frozen=True)
class FusedQKVLayout:
    num_query_groups: int
    heads_per_group: int
    head_dim: int

    @property
    def rows_per_group(self) -> int:
        return (self.heads_per_group + 2) * self.head_dim

    @property
    def total_rows(self) -> int:
        return self.num_query_groups * self.rows_per_group

    def rows_in_group(self, kind: Kind) -> tuple[int, int]:
        q = self.heads_per_group * self.head_dim
        return {
            "q": (0, q),
            "k": (q, q + self.head_dim),
            "v": (q + self.head_dim, q + 2 * self.head_dim),
        }[kind]

    def global_rows(self, kind: Kind) -> list[tuple[int, int]]:
        a, b = self.rows_in_group(kind)
        return [
            (g * self.rows_per_group + a, g * self.rows_per_group + b)
            for g in range(self.num_query_groups)
        ]

    def local_rows(self, kind: Kind, tp_rank: int = 0, tp_size: int = 1) -> RowRuns:
        """Rows of ``kind`` in this TP rank's contiguous chunk of the rows, rank-local numbering."""
        if self.total_rows % tp_size:
            raise ValueError(
                f"{self.total_rows} QKV rows do not split over tensor parallel size {tp_size}"
            )
        rows_local = self.total_rows // tp_size
        r0 = tp_rank * rows_local
        runs = []
        for ga, gb in self.global_rows(kind):
            a, b = max(ga, r0), min(gb, r0 + rows_local)
            if a < b:
                runs.append((a - r0, b - r0))
        return runs

    def head_rows(
        self, kind: Literal["q", "k"], tp_rank: int = 0, tp_size: int = 1
    ) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Each ``kind`` head this TP rank holds as ``((global group, head in group), rank-local
        [start, end) rows)``; a K head is numbered by its group (head 0). Tensor parallelism
        splits whole query groups."""
        if self.num_query_groups % tp_size:
            raise ValueError(
                f"{self.num_query_groups} query groups do not split over tensor parallel size "
                f"{tp_size}"
            )
        local, hd = self.num_query_groups // tp_size, self.head_dim
        out = []
        for g in range(local):
            base, group = g * self.rows_per_group, tp_rank * local + g
            if kind == "q":
                out.extend(
                    ((group, j), (base + j * hd, base + (j + 1) * hd))
                    for j in range(self.heads_per_group)
                )
            else:
                k0 = base + self.heads_per_group * hd
                out.append(((group, 0), (k0, k0 + hd)))
        return out

    def local_blocks(
        self,
        kind: Kind,
        *,
        row_len: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        lo: int = 0,
        hi: int | None = None,
    ) -> list[Block]:
        """Blocks of ``kind`` elements inside flat range ``[lo, hi)`` of this TP rank's shard.

        ``row_len`` is the number of elements per row (input size for a weight, 1 for a bias).
        Offsets are relative to ``lo``, i.e. to the start of an optimizer's shard.
        """
        rows = self.local_rows(kind, tp_rank, tp_size)  # refuses a row count TP does not divide
        hi = self.total_rows // tp_size * row_len if hi is None else hi
        return row_blocks(rows, row_len, lo, hi)


@dataclass(frozen=True)
class GatedFC1Layout:
    """A gated FFN's fused ``linear_fc1`` (``ffn_size`` gate rows and ``ffn_size`` up rows).

    TP rank ``r`` of ``tp`` holds ``[gate_r; up_r]``: its ``ffn_size / tp`` gate rows first, then
    its ``ffn_size / tp`` up rows (not a contiguous chunk of the unsplit ``[gate; up]``).
    """

    ffn_size: int

    def local_rows(
        self, kind: Literal["gate", "up"], tp_rank: int = 0, tp_size: int = 1
    ) -> RowRuns:
        if self.ffn_size % tp_size:
            raise ValueError(
                f"{self.ffn_size} FFN rows do not split over tensor parallel size {tp_size}"
            )
        half = self.ffn_size // tp_size
        return [(0, half)] if kind == "gate" else [(half, 2 * half)]


def row_blocks(rows: RowRuns, row_len: int, lo: int, hi: int) -> list[Block]:
    """Blocks of the elements of ``rows`` (rank-local row ranges of a tensor with ``row_len``
    elements per row) that fall inside the flat range ``[lo, hi)``; offsets relative to ``lo``."""
    runs: list[tuple[int, int]] = []
    for a, b in rows:
        s, e = max(a * row_len, lo), min(b * row_len, hi)
        if s < e:
            runs.append((s - lo, e - s))
    return _coalesce(runs)


def _coalesce(runs: list[tuple[int, int]]) -> list[Block]:
    """Merge equally long runs at a constant stride into strided blocks."""
    blocks: list[Block] = []
    for start, length in runs:
        if blocks:
            last = blocks[-1]
            if last.count == 1 and last.length == length and start > last.offset:
                blocks[-1] = Block(last.offset, 2, start - last.offset, length)
                continue
            if (
                last.count > 1
                and last.length == length
                and start == last.offset + last.count * last.stride
            ):
                blocks[-1] = Block(last.offset, last.count + 1, last.stride, length)
                continue
        blocks.append(Block(start, 1, length, length))
    return blocks
