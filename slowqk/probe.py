"""Attention probabilities out of megatron-core models, through the layer spec.

``probed(cls)`` derives from a core-attention class (megatron-core's local ``DotProductAttention``,
``SDPAttention`` or Transformer Engine's ``TEDotProductAttention``) a class that, while recording,
computes attention explicitly (:func:`slowqk.attention.explicit_attention`: scores, softmax,
weighted values, in fp32) from the very Q, K, V the fused kernel would get, and keeps the
probabilities. Recording happens only in the probe's eval-mode forward; training forwards go to the
backend unchanged. The module tree and state dict are unchanged, so checkpoints stay standard.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from slowqk.attention import effective_softmax_scale, explicit_attention, is_causal


class ProbeMixin:
    """Put first in the bases of a core-attention class (see :func:`probed`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # instance attributes from the start: under torch.compile the training graph's guard on
        # ``record`` then sees the same attribute before and after a probe
        self.record: bool = False
        self.probs: torch.Tensor | None = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, *args, **kwargs):
        if not self.record:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, *args, **kwargs
            )
        context, probs = explicit_attention(
            query,
            key,
            value,
            attention_mask,
            is_causal(self, attn_mask_type),
            effective_softmax_scale(self, query.shape[-1]),
        )
        self.probs = probs.detach()
        return context


@functools.cache
def probed(core_attention: type) -> type:
    """``core_attention`` with :class:`ProbeMixin` in front (one class per backend)."""
    return type(f"Probed{core_attention.__name__}", (ProbeMixin, core_attention), {})


def probed_layer_spec(spec):
    """A copy of a GPT layer spec whose core attention can record its probabilities."""
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = probed(attention.core_attention)
    return spec


@torch.no_grad()
def attention_probs(
    model: nn.Module,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    forward: Callable[[], object] | None = None,
) -> dict[int, torch.Tensor]:
    """One eval-mode forward; ``{global layer index: probs [batch, heads (all TP ranks), q, k]}``
    for the layers this rank holds.

    ``forward`` runs the forward pass (default: ``model(tokens, position_ids, None)``); under
    pipeline parallelism pass one that drives the pipeline schedule. Leaves the training RNG
    untouched (no dropout in eval mode) and restores the train/eval mode.
    """
    recorders: dict[int, ProbeMixin] = {}
    for module in model.modules():
        if isinstance(module, TransformerLayer):
            core = module.self_attention.core_attention
            if not isinstance(core, ProbeMixin):
                raise TypeError(
                    "the model was not built with probed_layer_spec(); no attention probabilities"
                )
            recorders[module.layer_number - 1] = core
    was_training = model.training
    model.eval()
    try:
        for r in recorders.values():
            r.record = True
        # Eager even under train.compile: the recording branch and the callers' hooks would
        # each cost a recompilation, and the probe's numbers are the eager model's.
        with torch.compiler.set_stance("force_eager"):
            if forward is None:
                model(tokens, position_ids, None)
            else:
                forward()
    finally:
        for r in recorders.values():
            r.record = False
        model.train(was_training)
    out = {}
    tp = (
        parallel_state.get_tensor_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )
    for layer, r in recorders.items():
        probs = r.probs.float()
        r.probs = None
        if tp > 1:  # heads are split over TP ranks: gather along the head dimension
            probs = gather_from_tensor_model_parallel_region(
                probs.transpose(1, 3).contiguous()
            ).transpose(1, 3)
        out[layer] = probs
    return out
