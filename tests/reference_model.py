"""An independent plain-PyTorch decoder with *separate* Q, K, V parameters.

Used as the reference for the learning-rate groups: each group's parts (Q, K, V, O, gate, up, down,
norms, embeddings, output) go into param groups of their own whose lr is ``lr * mult``, the
textbook way to give them a different learning rate.
Weights are loaded from (and written back to) megatron-core's TP-merged state dict layout.
With ``split_qk_heads`` every Q and K head is a parameter of its own (``q_heads.<h>``,
``k_heads.<g>``, their biases ``q_bias_heads``/``k_bias_heads``), for per-head learning rates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slowqk.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(mc: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or mc.hidden_size
    if mc.norm == "rmsnorm":
        return RMSNorm(dim, mc.norm_epsilon)
    return nn.LayerNorm(dim, eps=mc.norm_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Heads(nn.Module):
    """A Q or K projection whose heads are separate parameters (``weight.<h>``, ``bias.<h>``)."""

    def __init__(self, h: int, heads: int, hd: int, bias: bool) -> None:
        super().__init__()
        self.heads = nn.ParameterList(nn.Parameter(torch.empty(hd, h)) for _ in range(heads))
        self.biases = (
            nn.ParameterList(nn.Parameter(torch.zeros(hd)) for _ in range(heads)) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = torch.cat(list(self.biases)) if self.biases is not None else None
        return F.linear(x, torch.cat(list(self.heads)), b)

    @torch.no_grad()
    def load(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        for p, t in zip(self.heads, weight.chunk(len(self.heads)), strict=True):
            p.copy_(t)
        if self.biases is not None:
            for p, t in zip(self.biases, bias.chunk(len(self.biases)), strict=True):
                p.copy_(t)


class Block(nn.Module):
    def __init__(self, mc: ModelConfig, split_qk_heads: bool = False) -> None:
        super().__init__()
        h, nh = mc.hidden_size, mc.num_attention_heads
        ng = mc.num_query_groups or nh
        self.mc, self.nh, self.ng, self.hd = mc, nh, ng, h // nh
        self.ln1, self.ln2 = _norm(mc), _norm(mc)
        if split_qk_heads:
            self.q = Heads(h, nh, self.hd, mc.bias)
            self.k = Heads(h, ng, self.hd, mc.bias)
        else:
            self.q = nn.Linear(h, nh * self.hd, bias=mc.bias)
            self.k = nn.Linear(h, ng * self.hd, bias=mc.bias)
        self.v = nn.Linear(h, ng * self.hd, bias=mc.bias)
        self.o = nn.Linear(nh * self.hd, h, bias=mc.bias)
        if mc.qk_norm:  # per head, over head_dim, before RoPE (megatron-core's qk_layernorm)
            self.q_norm, self.k_norm = _norm(mc, self.hd), _norm(mc, self.hd)
        f = mc.ffn_size
        if mc.ffn == "swiglu":
            self.gate = nn.Linear(h, f, bias=mc.bias)
        self.up = nn.Linear(h, f, bias=mc.bias)
        self.down = nn.Linear(f, h, bias=mc.bias)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.nh, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.ng, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.ng, self.hd).transpose(1, 2)
        if self.mc.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.mc.position == "rope":
            inv = 1.0 / (
                self.mc.rotary_base ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd)
            )
            ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
            ang = torch.cat((ang, ang), dim=-1)
            cos, sin = ang.cos(), ang.sin()
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        rep = self.nh // self.ng
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        mask = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        self.last_probs = probs.detach()
        return self.o((probs @ v).transpose(1, 2).reshape(b, s, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        y = self.ln2(x)
        y = F.silu(self.gate(y)) * self.up(y) if self.mc.ffn == "swiglu" else F.gelu(self.up(y))
        return x + self.down(y)


class ReferenceGPT(nn.Module):
    def __init__(self, mc: ModelConfig, vocab_size: int, split_qk_heads: bool = False) -> None:
        super().__init__()
        self.mc = mc
        self.embed = nn.Embedding(vocab_size, mc.hidden_size)
        if mc.position == "learned":
            self.pos = nn.Embedding(mc.seq_length, mc.hidden_size)
        self.blocks = nn.ModuleList(Block(mc, split_qk_heads) for _ in range(mc.num_layers))
        self.ln_f = _norm(mc)
        if not mc.tie_embeddings:
            self.head = nn.Linear(mc.hidden_size, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.mc.position == "learned":
            x = x + self.pos(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        return x @ (self.embed.weight if self.mc.tie_embeddings else self.head.weight).T

    def loss(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.forward(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    # ------------------------------------------------------------- megatron layout <-> here

    def _qkv_split(self, blk: Block, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = t.view(blk.ng, (blk.nh // blk.ng + 2) * blk.hd, *t.shape[1:])
        qn = blk.nh // blk.ng * blk.hd
        q, k, v = rows[:, :qn], rows[:, qn : qn + blk.hd], rows[:, qn + blk.hd :]
        return tuple(x.reshape(-1, *t.shape[1:]) for x in (q, k, v))

    @torch.no_grad()
    def load_megatron(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a TP-merged megatron-core GPTModel state dict (fc1 as [gate; up] for swiglu)."""
        self.embed.weight.copy_(sd["embedding.word_embeddings.weight"])
        if self.mc.position == "learned":
            self.pos.weight.copy_(sd["embedding.position_embeddings.weight"])
        for i, blk in enumerate(self.blocks):
            p = f"decoder.layers.{i}."
            _copy_norm(blk.ln1, sd, p + "input_layernorm")
            _copy_norm(blk.ln2, sd, p + "pre_mlp_layernorm")
            weights = self._qkv_split(blk, sd[p + "self_attention.linear_qkv.weight"])
            biases = (
                self._qkv_split(blk, sd[p + "self_attention.linear_qkv.bias"])
                if self.mc.bias
                else (None, None, None)
            )
            for name, w, b in zip("qkv", weights, biases, strict=True):
                module = getattr(blk, name)
                if isinstance(module, Heads):
                    module.load(w, b)
                    continue
                module.weight.copy_(w)
                if b is not None:
                    module.bias.copy_(b)
            _copy_linear(blk.o, sd, p + "self_attention.linear_proj")
            if self.mc.qk_norm:
                _copy_norm(blk.q_norm, sd, p + "self_attention.q_layernorm")
                _copy_norm(blk.k_norm, sd, p + "self_attention.k_layernorm")
            fc1_w = sd[p + "mlp.linear_fc1.weight"]
            fc1_b = sd.get(p + "mlp.linear_fc1.bias")
            if self.mc.ffn == "swiglu":
                g, u = fc1_w.chunk(2, dim=0)
                blk.gate.weight.copy_(g)
                blk.up.weight.copy_(u)
                if fc1_b is not None:
                    gb, ub = fc1_b.chunk(2)
                    blk.gate.bias.copy_(gb)
                    blk.up.bias.copy_(ub)
            else:
                blk.up.weight.copy_(fc1_w)
                if fc1_b is not None:
                    blk.up.bias.copy_(fc1_b)
            _copy_linear(blk.down, sd, p + "mlp.linear_fc2")
        _copy_norm(self.ln_f, sd, "decoder.final_layernorm")
        if not self.mc.tie_embeddings:
            self.head.weight.copy_(sd["output_layer.weight"])

    def part_of(self, name: str) -> tuple[int | None, set[str]]:
        """``(layer or None, the group parts that name)`` of one of this model's parameters."""
        parts = name.split(".")
        if parts[0] == "blocks":
            module = parts[2]
            named = {
                "q": {"q"},
                "k": {"k"},
                "v": {"v"},
                "o": {"o"},
                "down": {"fc2"},
                "ln1": {"norm"},
                "ln2": {"norm"},
                "q_norm": {"norm"},
                "k_norm": {"norm"},
                "gate": {"gate", "fc1"},
                "up": {"up", "fc1"} if self.mc.ffn == "swiglu" else {"fc1"},
            }
            return int(parts[1]), named[module]
        return None, {"embed": {"embedding"}, "pos": {"embedding"}, "head": {"output"}}.get(
            parts[0], set()
        )

    def param_groups(self, lr: float, weight_decay: float, groups: list) -> list[dict]:
        """One param group per (group, decay) and the rest (``kind`` = "base"); ``groups`` have
        ``name``, ``parts``, ``layers`` (as ``slowqk.lr_groups.GroupSpec``)."""
        out: dict[tuple[str, float], dict] = {}
        for name, p in self.named_parameters():
            decay = weight_decay if p.ndim > 1 and not name.endswith("bias") else 0.0
            layer, parts = self.part_of(name)
            owners = [
                g.name
                for g in groups
                if parts & set(g.parts) and (layer is None or layer in g.layers)
            ]
            assert len(owners) <= 1, (name, owners)
            kind = owners[0] if owners else "base"
            out.setdefault((kind, decay), {"params": [], "kind": kind, "weight_decay": decay})[
                "params"
            ].append(p)
        return [dict(g, lr=lr) for g in out.values()]


def _copy_linear(lin: nn.Linear, sd: dict, prefix: str) -> None:
    lin.weight.copy_(sd[prefix + ".weight"])
    if lin.bias is not None:
        lin.bias.copy_(sd[prefix + ".bias"])


def _copy_norm(norm: nn.Module, sd: dict, prefix: str) -> None:
    norm.weight.copy_(sd[prefix + ".weight"])
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_(sd[prefix + ".bias"])
