"""torch's LayerNorm and RMSNorm for megatron-core's local layer spec, with sequence parallelism.

megatron-core's own wrapper (``WrappedTorchNorm``) refuses sequence parallelism: under it each
tensor-parallel rank normalizes its own slice of the sequence, so a norm's weight gradient is a
partial sum that must be summed over the tensor ranks, and megatron-core sums exactly the
parameters marked ``sequence_parallel`` (Transformer Engine's norms mark theirs). These are the
same torch modules, marked.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class TorchNorm:
    """``LayerNorm`` or ``RMSNorm`` as ``config.normalization`` says, built as megatron-core's
    ``WrappedTorchNorm`` builds it, its parameters marked for sequence parallelism."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm:
            raise ValueError("torch's norms have no zero-centered gamma or persistent kernel")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization {config.normalization!r}: expected {sorted(kinds)}")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
