"""Estimators of attention specialization and Q/K update size (pure tensor math, no framework).

Definitions (documented so results can be compared across runs):

- **Normalized attention entropy** of query position ``i`` (0-based) attending causally over
  ``n = i + 1`` keys: ``H_i / log(n)`` with ``H_i = -sum_j p_ij log p_ij``. It is 1 for uniform
  attention and 0 for one-hot attention. Position 0 (a single key, log 1 = 0) is left out. Reported
  as the mean over positions (and batch), per head.
- **Attention max-probability**: the mean over positions of ``max_j p_ij``.
- **Relative update** of W_Q (W_K): ``||W_after - W_before||_F / ||W_before||_F`` over the Q (K)
  rows of a fused ``linear_qkv`` weight.
"""

from __future__ import annotations

import torch

from slowqk.qk.selection import FusedQKVLayout


def attention_entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-head mean normalized entropy of causal attention ``probs`` [batch, heads, q, k]."""
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"expected probs of shape [batch, heads, seq, seq], got {tuple(probs.shape)}")
    seq = probs.shape[-1]
    if seq < 2:
        raise ValueError("need at least 2 positions (position 0 has a single key)")
    p = probs.double()
    h = -(p * torch.log(p.clamp_min(eps))).sum(-1)  # [b, h, q]
    norm = torch.log(torch.arange(1, seq + 1, dtype=torch.float64))  # log(i + 1)
    return (h[..., 1:] / norm[1:]).mean(dim=(0, 2))


def attention_max_prob(probs: torch.Tensor) -> torch.Tensor:
    """Per-head mean over positions (and batch) of the largest attention weight."""
    return probs.double().amax(-1).mean(dim=(0, 2))


def qk_relative_update(
    before: torch.Tensor, after: torch.Tensor, layout: FusedQKVLayout
) -> dict[str, float]:
    """``||dW|| / ||W||`` for the Q rows and the K rows of a full (TP-merged) fused QKV weight."""
    if before.shape != after.shape or before.shape[0] != layout.total_rows:
        raise ValueError(f"weights {tuple(before.shape)} / {tuple(after.shape)} do not match {layout.total_rows} QKV rows")
    out = {}
    for kind in ("q", "k"):
        rows = torch.cat([torch.arange(a, b) for a, b in layout.global_rows(kind)])
        w0, w1 = before[rows].double(), after[rows].double()
        out[kind] = float(torch.linalg.norm(w1 - w0) / torch.linalg.norm(w0))
    return out
