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
        for layer in self.weights:
            self.start.update(self._norms(layer))

    def _norms(self, layer: int) -> dict[HeadKey, float]:
        p = self.weights[layer]
        lay = p.layout
        local = lay.num_query_groups // p.tp_size
        q, k = head_norms(p.param, local, lay.heads_per_group, lay.head_dim)
        first = p.tp_rank * local
        out: dict[HeadKey, float] = {}
        for g, row in enumerate(q.tolist()):
            out.update({("q", layer, first + g, j): v for j, v in enumerate(row)})
        out.update({("k", layer, first + g, 0): v for g, v in enumerate(k.tolist())})
        return out

    def multipliers(self, layers: set[int]) -> dict[HeadKey, float]:
        """Each head's multiplier for the coming step, for the heads of ``layers``."""
        out: dict[HeadKey, float] = {}
        for layer in sorted(layers):
            now = self._norms(layer)
            keys = list(now)
            q_keys = [key for key in keys if key[0] == "q"]
            k_keys = [key for key in keys if key[0] == "k"]
            per_group = len(q_keys) // len(k_keys)

            def table(ks: list[HeadKey], norms: dict[HeadKey, float]) -> torch.Tensor:
                return torch.tensor([norms[key] for key in ks], dtype=torch.float32)

            q, q0 = (table(q_keys, n).view(len(k_keys), per_group) for n in (now, self.start))
            k, k0 = table(k_keys, now), table(k_keys, self.start)
            mult_q, mult_k = multipliers(q, k, q0, k0, self.tau)
            out.update(zip(q_keys, mult_q.reshape(-1).tolist(), strict=True))
            out.update(zip(k_keys, mult_k.tolist(), strict=True))
        return out

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
