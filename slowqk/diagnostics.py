"""Estimators of attention specialization and Q/K update size (pure tensor math, no framework).

Definitions (documented so results can be compared across runs):

- **Normalized attention entropy** of query position ``i`` (0-based) attending causally over
  ``n = i + 1`` keys: ``H_i / log(n)`` with ``H_i = -sum_j p_ij log p_ij``. It is 1 for uniform
  attention and 0 for one-hot attention. Position 0 (a single key, log 1 = 0) is left out. Reported
  as the mean over positions (and batch), per head.
- **Attention max-probability**: the mean over positions of ``max_j p_ij``.
- **Relative update** of W_Q (W_K): ``||W_after - W_before||_F / ||W_before||_F`` over the Q (K)
  rows of a fused ``linear_qkv`` weight.
- **lambda_Q, lambda_K** (our estimators of the paper's step-size factors; not its exact,
  unpublished definitions): how far one optimizer step's update of W_Q (W_K) moves a layer's
  attention logits, relative to their size. With ``X`` the input of ``linear_qkv`` on the probe
  batch, ``S = Q K^T`` the pre-RoPE, unscaled logits over causal pairs ``j <= i`` and
  ``dQ = X dW_Q^T + db_Q``::

      lambda_Q = ||dQ K^T||_F / ||S||_F        lambda_K = ||Q dK^T||_F / ||S||_F

  (the first-order change of ``S`` from each side, with ``Q``, ``K`` before the step).
- **R_P / ||X||_F^2** at layer ``l`` (our estimator of the paper's residual-energy factor): the
  energy the FFNs below ``l`` wrote into the residual stream, relative to the stream's energy where
  it enters ``l``: ``sum_{m<l} ||f_m||_F^2 / ||X_l||_F^2``, from per-layer RMS values (all
  tensors have the same size, so energies are RMS squared).
"""

from __future__ import annotations

import torch

from slowqk.lr_groups.rows import FusedQKVLayout


def attention_entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-head mean normalized entropy of causal attention ``probs`` [batch, heads, q, k]."""
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(
            f"expected probs of shape [batch, heads, seq, seq], got {tuple(probs.shape)}"
        )
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
        raise ValueError(
            f"weights {tuple(before.shape)} / {tuple(after.shape)} do not match "
            f"{layout.total_rows} QKV rows"
        )
    out = {}
    for kind in ("q", "k"):
        rows = torch.cat([torch.arange(a, b) for a, b in layout.global_rows(kind)])
        w0, w1 = before[rows].double(), after[rows].double()
        out[kind] = float(torch.linalg.norm(w1 - w0) / torch.linalg.norm(w0))
    return out


def qk_logit_change_sums(
    x: torch.Tensor,
    w_before: torch.Tensor,
    w_after: torch.Tensor,
    b_before: torch.Tensor | None,
    b_after: torch.Tensor | None,
    *,
    heads_per_group: int,
    head_dim: int,
) -> tuple[float, float, float]:
    """``(||dQ K^T||^2, ||Q dK^T||^2, ||S||^2)`` summed over causal pairs, for the query groups in
    ``w`` (a whole fused weight or one TP rank's rows: the sums add up across ranks).

    ``x`` is ``[seq, batch, hidden]``; ``w`` is ``[groups * (heads_per_group + 2) * head_dim,
    hidden]``.
    """
    rows = (heads_per_group + 2) * head_dim
    if (
        w_before.shape != w_after.shape
        or w_before.shape[0] % rows
        or w_before.shape[1] != x.shape[-1]
    ):
        raise ValueError(
            f"weight {tuple(w_before.shape)} is not a fused QKV of {rows}-row groups over hidden "
            f"{x.shape[-1]}"
        )
    groups = w_before.shape[0] // rows
    x = x.double()
    q_rows = heads_per_group * head_dim

    def project(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.einsum("sbh,rh->bsr", x, w.double())
        if b is not None:
            y = y + b.double()
        y = y.view(*y.shape[:2], groups, rows)
        q = (
            y[..., :q_rows]
            .reshape(*y.shape[:2], groups * heads_per_group, head_dim)
            .transpose(1, 2)
        )
        k = y[..., q_rows : q_rows + head_dim].transpose(1, 2)  # [b, groups, s, d]
        return q, k.repeat_interleave(heads_per_group, dim=1)

    q0, k0 = project(w_before, b_before)
    q1, k1 = project(w_after, b_after)
    causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool, device=x.device).tril()

    def energy(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a @ b.transpose(-1, -2))[..., causal].pow(2).sum())

    return energy(q1 - q0, k0), energy(q0, k1 - k0), energy(q0, k0)


def pathway_energy_ratio(
    ffn_write_rms: dict[int, float], residual_rms: dict[int, float]
) -> dict[int, float]:
    """``R_P / ||X||_F^2`` per layer (see the module doc) from per-layer RMS values."""
    out, below = {}, 0.0
    for layer in sorted(residual_rms):
        out[layer] = below / residual_rms[layer] ** 2
        below += ffn_write_rms.get(layer, 0.0) ** 2
    return out
