"""The plain-PyTorch decoder a user would write instead of megatron-core, for the throughput
baseline.

Same shapes as a recipe's model (layers, width, heads, GQA, FFN, norm, biases, positions, tied
embeddings, padded vocabulary), written the direct way: one fused QKV linear, torch's
``scaled_dot_product_attention`` (causal, ``enable_gqa``), ``nn.RMSNorm`` / ``nn.LayerNorm``, fp32
parameters under bf16 autocast, fused AdamW. Used only by ``tools/bench_gpu.py`` (cases ``plain``
and ``plain-compiled``, and under DistributedDataParallel with ``--nproc``); not a training path
of the project.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


class PlainBlock(nn.Module):
    def __init__(self, m) -> None:
        super().__init__()
        h, heads = m.hidden_size, m.num_attention_heads
        self.heads, self.groups, self.head_dim = heads, m.num_query_groups or heads, h // heads
        norm = nn.RMSNorm if m.norm == "rmsnorm" else nn.LayerNorm
        self.norm1, self.norm2 = norm(h, eps=m.norm_epsilon), norm(h, eps=m.norm_epsilon)
        self.qkv = nn.Linear(h, (heads + 2 * self.groups) * self.head_dim, bias=m.bias)
        self.proj = nn.Linear(h, h, bias=m.bias)
        self.gated = m.ffn == "swiglu"
        self.fc1 = nn.Linear(h, (2 if self.gated else 1) * m.ffn_size, bias=m.bias)
        self.fc2 = nn.Linear(m.ffn_size, h, bias=m.bias)

    @staticmethod
    def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:  # x: [b, heads, s, head_dim]
        cos, sin = rope[0, : x.shape[2]].to(x.dtype), rope[1, : x.shape[2]].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-second, first), dim=-1) * sin

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        """``rope``: cos and sin ``[2, s, head_dim]``, or None for learned positions."""
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim],
            dim=-1,
        )
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.groups, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.groups, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = self._rotate(q, rope), self._rotate(k, rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.groups != self.heads
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, -1))
        z = self.fc1(self.norm2(x))
        if self.gated:
            gate, up = z.chunk(2, dim=-1)
            z = F.silu(gate) * up
        else:
            z = F.gelu(z)
        return x + self.fc2(z)


class PlainDecoder(nn.Module):
    def __init__(self, m, vocab_size: int) -> None:
        super().__init__()
        h = m.hidden_size
        self.embed = nn.Embedding(vocab_size, h)
        self.pos = nn.Embedding(m.seq_length, h) if m.position == "learned" else None
        rope = None
        if m.position == "rope":
            hd = h // m.num_attention_heads
            inv = 1.0 / (m.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            angles = torch.outer(torch.arange(m.seq_length).float(), inv).repeat(1, 2)
            rope = torch.stack((angles.cos(), angles.sin()))
        self.register_buffer("rope", rope, persistent=False)
        self.blocks = nn.ModuleList(PlainBlock(m) for _ in range(m.num_layers))
        self.norm = (nn.RMSNorm if m.norm == "rmsnorm" else nn.LayerNorm)(h, eps=m.norm_epsilon)
        self.head = None if m.tie_embeddings else nn.Linear(h, vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=m.init_method_std)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, self.rope)
        logits = F.linear(
            self.norm(x), self.embed.weight if self.head is None else self.head.weight
        )
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def plain_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple]
) -> float:
    """One optimizer step over micro-batches (gradient accumulation), bf16 autocast on CUDA."""
    device_type = next(model.parameters()).device.type
    total = 0.0
    for i, (ids, labels) in enumerate(batches):
        # under DistributedDataParallel: one gradient all-reduce a step, in the last backward
        last = i == len(batches) - 1
        with model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext():
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
                loss = model(ids, labels) / len(batches)
            loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total)
