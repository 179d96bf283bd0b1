"""megatron-core's parallel linear layers, with a direct path when they hold the whole weight.

At one tensor-parallel rank ``ColumnParallelLinear`` and ``RowParallelLinear`` communicate
nothing, yet every call still goes through megatron-core's own ``autograd.Function`` (saving its
context, reshaping for the weight gradient in Python) and an identity ``autograd.Function`` for
the region it would copy or reduce. The direct path is ``F.linear`` without bias plus the bias
added after it, the same products megatron-core computes, differentiated by autograd's own
matmul backward: the same bits in the output and both gradients (tests/test_linear.py), about
0.2-0.4 ms less a call on the 2-core CPU (fwd + bwd, tiny/gpt's shapes).

Anything the direct path does not cover (a tensor-parallel group of two or more, sequence
parallelism, fused or deferred weight-gradient accumulation, expert layers, CPU offloading, a
weight passed in) takes megatron-core's path unchanged. Parameters, their attributes and the
sharded state dict are the parents': checkpoints and conversions do not see the difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.parallel_state import get_tensor_model_parallel_world_size
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def _whole_weight(layer) -> bool:
    """True where megatron-core's forward would only compute ``x @ W.T (+ b)`` on this rank.
    An attribute another megatron-core version lacks counts against the direct path."""
    config = layer.config
    group = getattr(layer, "tp_group", None)
    ranks = group.size() if group is not None else get_tensor_model_parallel_world_size()
    return (
        ranks == 1
        and not getattr(layer, "is_expert", True)
        and not getattr(layer, "sequence_parallel", True)
        and not getattr(layer, "gradient_accumulation_fusion", True)
        and not getattr(layer, "explicit_expert_comm", True)
        and not getattr(config, "defer_embedding_wgrad_compute", False)
        and not getattr(config, "cpu_offloading", False)
    )


def _direct(layer, input_: torch.Tensor, weight: torch.Tensor):
    output = F.linear(input_, weight)
    if layer.skip_bias_add:
        return output, layer.bias
    if layer.bias is not None:  # after the matmul, as megatron-core adds it
        output = output + layer.bias
    return output, None


class DirectColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.direct = _whole_weight(self)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.direct or weight is not None or self.weight is None:
            return super().forward(input_, weight, runtime_gather_output)
        return _direct(self, input_, self.weight)


class DirectRowParallelLinear(RowParallelLinear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.direct = _whole_weight(self)

    def forward(self, input_):
        if not self.direct:
            return super().forward(input_)
        return _direct(self, input_, self.weight)
