"""Attention probabilities out of megatron-core models, through the layer spec.

``ProbedDotProductAttention`` is megatron-core's ``DotProductAttention`` with its (parameter-free)
softmax module wrapped so that, while recording, the attention probabilities of the last forward
are kept. The module tree and state dict are unchanged, so checkpoints stay standard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import nn


class _RecordingSoftmax(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.record = False
        self.probs: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if self.record:
            self.probs = out.detach()
        return out


class ProbedDotProductAttention(DotProductAttention):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale_mask_softmax = _RecordingSoftmax(self.scale_mask_softmax)


def probed_layer_spec(spec):
    """A copy of a local GPT layer spec whose core attention records its probabilities."""
    import copy

    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = ProbedDotProductAttention
    return spec


@torch.no_grad()
def attention_probs(
    model: nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor, forward: Callable[[], object] | None = None
) -> dict[int, torch.Tensor]:
    """One eval-mode forward; ``{global layer index: probs [batch, heads (all TP ranks), q, k]}``
    for the layers this rank holds.

    ``forward`` runs the forward pass (default: ``model(tokens, position_ids, None)``); under
    pipeline parallelism pass one that drives the pipeline schedule. Leaves the training RNG
    untouched (no dropout in eval mode) and restores the train/eval mode.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.transformer.transformer_layer import TransformerLayer

    recorders: dict[int, _RecordingSoftmax] = {}
    for module in model.modules():
        if isinstance(module, TransformerLayer):
            core = module.self_attention.core_attention
            if not isinstance(core, ProbedDotProductAttention):
                raise TypeError("the model was not built with probed_layer_spec(); no attention probabilities")
            recorders[module.layer_number - 1] = core.scale_mask_softmax
    was_training = model.training
    model.eval()
    try:
        for r in recorders.values():
            r.record = True
        if forward is None:
            model(tokens, position_ids, None)
        else:
            forward()
    finally:
        for r in recorders.values():
            r.record = False
        model.train(was_training)
    out = {}
    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    for layer, r in recorders.items():
        probs = r.probs.float()
        r.probs = None
        if tp > 1:  # heads are split over TP ranks: gather along the head dimension
            probs = gather_from_tensor_model_parallel_region(probs.transpose(1, 3).contiguous()).transpose(1, 3)
        out[layer] = probs
    return out
