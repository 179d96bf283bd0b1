"""Per-head learning-rate multipliers recomputed from the weights before every step: the QuacK
rule (:mod:`slowqk.qk.quack`) on the fused QKV weights this rank holds.

Heads are keyed globally, ``(kind, layer, query group, head in group)`` (a K head is head 0 of its
group), so the norms at the start, which a checkpoint keeps, hold under any other tensor or
pipeline layout on resume. The norms are those of the model weights the step's forward used
(TP-local, whole on every data-parallel rank, as megatron-core and ZeRO 1-2 hold them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from slowqk.lr_groups.params import QKVParam
from slowqk.qk.quack import head_norms, multipliers

HeadKey = tuple[str, int, int, int]  # (kind, layer, global query group, head in group)


class QuacKRule:
    """QuacK's multipliers of the Q and K heads of the layers whose QKV weights this rank holds,
    with ``tau`` (the multiplier at the start)."""

    def __init__(self, qkv: list[QKVParam], tau: float) -> None:
        self.tau = tau
        self.weights = {p.layer: p for p in qkv if p.row_len > 1}  # biases follow their heads
        self.start: dict[HeadKey, float] = {}
        self.take_start()

    def take_start(self) -> None:
        """The norms now are the start (a fresh run's first weights, or its ``init_from``)."""
        layers = sorted(self.weights)
        self.start = dict(zip(self._keys(layers), self._flat_norms(layers).tolist(), strict=True))

    def _keys(self, layers: list[int]) -> list[HeadKey]:
        """Each layer's Q heads (group-major), then its K heads, as :meth:`_norms` orders them and
        numbered as the rows' layout numbers them (:meth:`FusedQKVLayout.head_rows`)."""
        keys: list[HeadKey] = []
        for layer in layers:
            p = self.weights[layer]
            for kind in ("q", "k"):
                rows = p.layout.head_rows(kind, p.tp_rank, p.tp_size)
                keys += [(kind, layer, group, head) for (group, head), _run in rows]
        return keys

    def _norms(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.weights[layer]
        lay = p.layout
        return head_norms(
            p.param, lay.num_query_groups // p.tp_size, lay.heads_per_group, lay.head_dim
        )

    def _flat_norms(self, layers: list[int]) -> torch.Tensor:
        parts = [t.reshape(-1) for layer in layers for t in self._norms(layer)]
        return torch.cat(parts) if parts else torch.zeros(0)

    def multipliers(self, layers: set[int]) -> dict[HeadKey, float]:
        """Each head's multiplier for the coming step, for the heads of ``layers`` (one transfer
        to the host for all of them)."""
        flat, keys = [], []
        for layer in sorted(layers):
            q, k = self._norms(layer)
            layer_keys = self._keys([layer])
            start = [self.start[key] for key in layer_keys]
            start = torch.tensor(start, dtype=q.dtype, device=q.device)
            q0, k0 = start[: q.numel()].view_as(q), start[q.numel() :]
            mult_q, mult_k = multipliers(q, k, q0, k0, self.tau)
            flat += [mult_q.reshape(-1), mult_k]
            keys += layer_keys
        values = torch.cat(flat).tolist() if flat else []
        return dict(zip(keys, values, strict=True))

    def gather_start(self) -> None:
        """Every rank's start norms on every rank, so a checkpoint (written from rank 0's copy)
        holds all heads."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.start)
            for part in parts:
                self.start.update(part)

    def state_dict(self) -> dict[str, Any]:
        return {"start_norms": [[*key, value] for key, value in sorted(self.start.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = {
            (kind, int(layer), int(group), int(head)): float(value)
            for kind, layer, group, head, value in state["start_norms"]
        }
