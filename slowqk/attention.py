"""Core-attention modules for megatron-core's layer spec (``core_attention=``).

``SDPAttention`` is megatron-core's ``DotProductAttention`` with only its forward replaced by
``torch.nn.functional.scaled_dot_product_attention``: on GPUs torch picks flash / cuDNN /
memory-efficient kernels that never materialize the s x s scores; on CPU it runs its math path.
Everything else (head partitioning over tensor-parallel ranks, softmax scale, the dropout module,
sharded state dict) is inherited, so weights and checkpoints are those of the local spec.

``explicit_attention`` is the textbook computation (scores, softmax, weighted values) that also
returns the probabilities; the diagnostics probe uses it whatever backend trains the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"model.attention_backend=sdpa does not support {what}; use local or te"
    )


def explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention on megatron's layouts, in fp32: q ``[sq, b, np, hn]``, k/v ``[sk, b, ng, hn]``,
    ``attention_mask`` True where masked out (megatron's convention). Returns the context
    ``[sq, b, np * hn]`` in the query's dtype and the probabilities ``[b, np, sq, sk]`` (fp32)."""
    sq, b, heads, hn = query.shape
    rep = heads // key.shape[2]
    q, k, v = (t.permute(1, 2, 0, 3).float() for t in (query, key, value))
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask, float("-inf"))
    elif causal:
        future = torch.ones(sq, k.shape[2], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = scores.softmax(dim=-1)
    context = (probs @ v).to(query.dtype).permute(2, 0, 1, 3).reshape(sq, b, heads * hn)
    return context, probs


def effective_softmax_scale(module: torch.nn.Module, head_dim: int) -> float:
    """The scale a core-attention module applies to q.k (megatron's local and TE modules)."""
    scale = getattr(module, "softmax_scale", None) or 1.0 / math.sqrt(head_dim)
    config = getattr(module, "config", None)
    if (
        isinstance(module, DotProductAttention)
        and config is not None
        and config.apply_query_key_layer_scaling
    ):
        scale *= (
            module.layer_number
        )  # the local module divides here and multiplies inside its softmax
    return scale


def is_causal(module: torch.nn.Module, attn_mask_type: AttnMaskType | None) -> bool:
    return (attn_mask_type or getattr(module, "attn_mask_type", None)) == AttnMaskType.causal


class SDPAttention(DotProductAttention):
    """Core attention through torch's ``scaled_dot_product_attention`` (causal, GQA, dropout)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.config.softmax_type != "vanilla":
            raise _unsupported(f"softmax_type={self.config.softmax_type!r}")
        if getattr(self.scale_mask_softmax, "window_size", None) is not None:
            raise _unsupported("sliding-window attention")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise _unsupported("packed sequences")
        if attention_bias is not None:
            raise _unsupported("an attention bias")
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, hn] -> [b, heads, s, hn]: views, the head dim stays contiguous
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = attention_mask is None and is_causal(self, attn_mask_type)
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = may attend
        dropout = self.attention_dropout.p if self.training else 0.0
        kwargs = dict(
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal,
            scale=effective_softmax_scale(self, query.shape[-1]),
            enable_gqa=q.shape[1] != k.shape[1],
        )
        if dropout > 0 and not self.config.sequence_parallel:
            # per-TP-rank dropout pattern, as megatron's local attention draws it
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
