"""QuacK (Anson & Aitchison 2025, arXiv 2511.21377): each head's Q learning rate from its K norm,
and its K learning rate from its Q norm (pure logic).

An attention logit is ``q . k = x W_Q^T W_K y``: a step on ``W_Q`` changes it in proportion to
``||W_K||`` and a step on ``W_K`` in proportion to ``||W_Q||``. With an update whose size per unit
of learning rate is bounded (Adam, Muon), scaling each head's Q learning rate by ``1 / ||W_K||`` and
its K learning rate by ``1 / ||W_Q||`` bounds the change of the logits whatever the weights' size.
The paper's Algorithm 1 normalizes by the norms at initialization, so the multiplier starts at the
constant ``tau``:

    mult_Q(head h of group g) = tau * ||W_K^g||_0 / ||W_K^g||
    mult_K(group g)           = tau * max_h ||W_Q^h||_0 / max_h ||W_Q^h||   (h in group g)

with Frobenius norms of each head's rows, recomputed before every step. With grouped-query
attention one K head serves several Q heads; its rate follows the largest of their norms, the
paper's rule for a matrix that heads share (its multi-head latent attention case), so the bound
holds for every head of the group. Without GQA both lines are the paper's per-head rule.
"""

from __future__ import annotations

import torch


def head_norms(
    weight: torch.Tensor, groups: int, heads_per_group: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frobenius norms of each Q head's rows (``[groups, heads_per_group]``) and each K head's
    rows (``[groups]``) of a fused QKV weight laid out per query group as
    ``[q_0 .. q_{n-1}, k, v]`` (``head_dim`` rows each), as megatron-core stores ``linear_qkv``."""
    w = weight.detach()
    w = w.to(torch.promote_types(w.dtype, torch.float32))  # bf16 weights: fp32 norms
    w = w.reshape(groups, heads_per_group + 2, head_dim * weight.shape[-1])
    norms = torch.linalg.vector_norm(w, dim=2)
    return norms[:, :heads_per_group], norms[:, heads_per_group]


def multipliers(
    q: torch.Tensor, k: torch.Tensor, q0: torch.Tensor, k0: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The learning-rate multipliers of each Q head (``[groups, heads_per_group]``) and each K head
    (``[groups]``) from the norms now (``q``, ``k``) and at the start (``q0``, ``k0``)."""
    mult_q = (tau * k0 / k).unsqueeze(1).expand_as(q)
    mult_k = tau * q0.amax(dim=1) / q.amax(dim=1)
    return mult_q, mult_k
