"""Exact mappings between megatron-core checkpoint tensors and Hugging Face GPT-2 / LLaMA / Qwen3
weights (Qwen3 is the LLaMA block with per-head QK-norm, ``model.qk_norm``).

Megatron-core's distributed checkpoints store each layer parameter as one global tensor stacked
over layers (``decoder.layers.<name>`` of shape ``[num_layers, ...]``), TP shards already merged,
with the names of the Transformer Engine layout (the pre-attention norm is
``self_attention.linear_qkv.layer_norm_weight``, the pre-MLP norm
``mlp.linear_fc1.layer_norm_weight``).
Conventions that matter:

- ``linear_qkv`` rows are grouped per query group: ``[q heads of group 0, k_0, v_0, q heads of
  group 1, ...]``; Hugging Face keeps Q, K and V apart (LLaMA) or concatenated ``[Q | K | V]``
  (GPT-2's ``c_attn``).
- SwiGLU ``linear_fc1`` is ``[gate; up]`` and computes ``silu(gate) * up`` as LLaMA does.
- RoPE: megatron-core's default (non-interleaved, ``rotate_half``) is LLaMA's in ``transformers``;
  no row permutation is needed (that permutation exists for Meta's original interleaved weights).
- GPT-2's ``Conv1D`` stores ``[in, out]``: weights are transposed.
- The embedding keeps its padded rows (megatron-core pads the vocabulary for TP): those rows take
  part in the softmax during training, so dropping them would change every probability. The HF
  ``vocab_size`` is the padded size; the tokenizer never emits the extra ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from slowqk.config import ModelConfig


class UnsupportedArchitecture(ValueError):
    """The model mixes parts no stock Hugging Face architecture expresses exactly."""


@dataclass(frozen=True)
class Dims:
    num_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int

    @classmethod
    def of(cls, model: ModelConfig) -> Dims:
        return cls(
            model.num_layers,
            model.hidden_size,
            model.num_attention_heads,
            model.num_query_groups or model.num_attention_heads,
            model.hidden_size // model.num_attention_heads,
            model.ffn_size,
        )


# model.gelu <-> GPT-2's activation_function; the HF names of the tanh approximation all compute
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (to float rounding)
GELU_TO_HF = {"exact": "gelu", "tanh": "gelu_new"}
GELU_FROM_HF = {
    "gelu": "exact",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
}


def family(model: ModelConfig) -> str:
    """``"gpt2"``, ``"llama"`` or ``"qwen3"`` (the LLaMA block with QK-norm), or
    :class:`UnsupportedArchitecture` naming the part that does not fit."""
    parts = {"ffn": model.ffn, "norm": model.norm, "position": model.position}
    if model.qk_norm:
        if parts != {"ffn": "swiglu", "norm": "rmsnorm", "position": "rope"}:
            raise UnsupportedArchitecture(
                "model.qk_norm=true: the only stock Hugging Face architecture with per-head "
                "QK-norm is Qwen3ForCausalLM, a LLaMA block (needs ffn=swiglu, norm=rmsnorm, "
                f"position=rope; got ffn={model.ffn}, norm={model.norm}, position={model.position})"
            )
        if model.bias:
            raise UnsupportedArchitecture(
                "model.bias=true with model.qk_norm=true: Qwen3ForCausalLM has no MLP biases"
            )
        return "qwen3"
    if parts == {"ffn": "gelu", "norm": "layernorm", "position": "learned"}:
        if model.num_query_groups not in (None, model.num_attention_heads):
            raise UnsupportedArchitecture(
                f"model.num_query_groups={model.num_query_groups}: GPT2LMHeadModel has no "
                "grouped-query attention"
            )
        if not model.tie_embeddings:
            raise UnsupportedArchitecture(
                "model.tie_embeddings=false: GPT2LMHeadModel ties its output layer to wte"
            )
        return "gpt2"
    if parts == {"ffn": "swiglu", "norm": "rmsnorm", "position": "rope"}:
        return "llama"  # biases map to attention_bias / mlp_bias (model.gelu does not apply)
    gpt2 = {"ffn": "gelu", "norm": "layernorm", "position": "learned"}
    llama = {"ffn": "swiglu", "norm": "rmsnorm", "position": "rope"}
    off_gpt2 = [f"model.{k}={v}" for k, v in parts.items() if gpt2[k] != v]
    off_llama = [f"model.{k}={v}" for k, v in parts.items() if llama[k] != v]
    raise UnsupportedArchitecture(
        f"no stock Hugging Face architecture expresses this mix exactly: as GPT2LMHeadModel it has "
        f"{', '.join(off_gpt2)} (GPT-2 needs ffn=gelu, norm=layernorm, position=learned); as "
        f"LlamaForCausalLM it has {', '.join(off_llama)} (LLaMA needs ffn=swiglu, norm=rmsnorm, "
        "position=rope)"
    )


def hf_config(model: ModelConfig, vocab_size: int, bos: int | None, eos: int | None):
    # deferred: transformers is an optional extra, imported only where used
    from transformers import GPT2Config, LlamaConfig, Qwen3Config

    d = Dims.of(model)
    kind = family(model)
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=model.seq_length,
            n_embd=d.hidden,
            n_layer=d.num_layers,
            n_head=d.heads,
            n_inner=d.ffn,
            activation_function=GELU_TO_HF[model.gelu],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=model.norm_epsilon,
            initializer_range=model.init_method_std,
            bos_token_id=bos,
            eos_token_id=eos,
            tie_word_embeddings=True,
            architectures=["GPT2LMHeadModel"],
        )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=d.hidden,
        intermediate_size=d.ffn,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.groups,
        head_dim=d.head_dim,
        hidden_act="silu",
        max_position_embeddings=model.seq_length,
        initializer_range=model.init_method_std,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=model.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(int(model.rotary_base))},
        attention_bias=model.bias,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    if kind == "qwen3":  # its QK-norm eps is rms_norm_eps, as megatron-core's qk_layernorm
        return Qwen3Config(**common, use_sliding_window=False, architectures=["Qwen3ForCausalLM"])
    return LlamaConfig(**common, mlp_bias=model.bias, architectures=["LlamaForCausalLM"])


# ------------------------------------------------------------------------------ fused QKV


def split_qkv(w: torch.Tensor, d: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group fused rows (weight ``[rows, hidden]`` or bias ``[rows]``) -> Q, K, V in head
    order."""
    hpg = d.heads // d.groups
    g = w.reshape(d.groups, (hpg + 2) * d.head_dim, *w.shape[1:])
    q = g[:, : hpg * d.head_dim].reshape(d.heads * d.head_dim, *w.shape[1:])
    k = g[:, hpg * d.head_dim : (hpg + 1) * d.head_dim].reshape(d.groups * d.head_dim, *w.shape[1:])
    v = g[:, (hpg + 1) * d.head_dim :].reshape(d.groups * d.head_dim, *w.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Dims) -> torch.Tensor:
    hpg = d.heads // d.groups
    rest = q.shape[1:]
    parts = (
        q.reshape(d.groups, hpg * d.head_dim, *rest),
        k.reshape(d.groups, d.head_dim, *rest),
        v.reshape(d.groups, d.head_dim, *rest),
    )
    return torch.cat(parts, dim=1).reshape(-1, *rest).contiguous()


# ------------------------------------------------------------------------------ name maps


@dataclass(frozen=True)
class Rule:
    """One megatron checkpoint key <-> one or more HF tensors (per layer when ``layered``)."""

    key: str
    hf: tuple[str, ...]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    from_hf: Callable[..., torch.Tensor]
    layered: bool = True


def _same(t: torch.Tensor) -> tuple[torch.Tensor]:
    return (t.contiguous(),)


def _ident(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


def _t(t: torch.Tensor) -> tuple[torch.Tensor]:
    return (t.t().contiguous(),)


def _untranspose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def rules(model: ModelConfig) -> list[Rule]:
    """The complete key map for ``model`` (which must be exportable: see :func:`family`)."""
    d = Dims.of(model)
    L = "decoder.layers."
    if family(model) == "gpt2":

        def c_attn(w):
            return (torch.cat(split_qkv(w, d), 0).t().contiguous(),)

        def c_attn_back(w):
            wt = w.t() if w.dim() == 2 else w
            q, k, v = wt.split(d.hidden, dim=0)
            return merge_qkv(q, k, v, d)

        def c_attn_bias(b):
            return (torch.cat(split_qkv(b, d), 0).contiguous(),)

        out = [
            Rule(
                "embedding.word_embeddings.weight",
                ("transformer.wte.weight",),
                _same,
                _ident,
                layered=False,
            ),
            Rule(
                "embedding.position_embeddings.weight",
                ("transformer.wpe.weight",),
                _same,
                _ident,
                layered=False,
            ),
            Rule(
                L + "self_attention.linear_qkv.layer_norm_weight",
                ("transformer.h.{i}.ln_1.weight",),
                _same,
                _ident,
            ),
            Rule(
                L + "self_attention.linear_qkv.layer_norm_bias",
                ("transformer.h.{i}.ln_1.bias",),
                _same,
                _ident,
            ),
            Rule(
                L + "self_attention.linear_qkv.weight",
                ("transformer.h.{i}.attn.c_attn.weight",),
                c_attn,
                c_attn_back,
            ),
            Rule(
                L + "self_attention.linear_proj.weight",
                ("transformer.h.{i}.attn.c_proj.weight",),
                _t,
                _untranspose,
            ),
            Rule(
                L + "mlp.linear_fc1.layer_norm_weight",
                ("transformer.h.{i}.ln_2.weight",),
                _same,
                _ident,
            ),
            Rule(
                L + "mlp.linear_fc1.layer_norm_bias",
                ("transformer.h.{i}.ln_2.bias",),
                _same,
                _ident,
            ),
            Rule(
                L + "mlp.linear_fc1.weight",
                ("transformer.h.{i}.mlp.c_fc.weight",),
                _t,
                _untranspose,
            ),
            Rule(
                L + "mlp.linear_fc2.weight",
                ("transformer.h.{i}.mlp.c_proj.weight",),
                _t,
                _untranspose,
            ),
            Rule(
                "decoder.final_layernorm.weight",
                ("transformer.ln_f.weight",),
                _same,
                _ident,
                layered=False,
            ),
            Rule(
                "decoder.final_layernorm.bias",
                ("transformer.ln_f.bias",),
                _same,
                _ident,
                layered=False,
            ),
        ]
        bias_rules = [
            Rule(
                L + "self_attention.linear_qkv.bias",
                ("transformer.h.{i}.attn.c_attn.bias",),
                c_attn_bias,
                c_attn_back,
            ),
            Rule(
                L + "self_attention.linear_proj.bias",
                ("transformer.h.{i}.attn.c_proj.bias",),
                _same,
                _ident,
            ),
            Rule(L + "mlp.linear_fc1.bias", ("transformer.h.{i}.mlp.c_fc.bias",), _same, _ident),
            Rule(L + "mlp.linear_fc2.bias", ("transformer.h.{i}.mlp.c_proj.bias",), _same, _ident),
        ]
        return (
            out + bias_rules
        )  # without model.bias these are exported as zeros (GPT-2 always has them)

    def qkv(w):
        return split_qkv(w, d)

    def qkv_back(q, k, v):
        return merge_qkv(q, k, v, d)

    def gate_up(w):
        gate, up = w.chunk(2, dim=0)
        return gate.contiguous(), up.contiguous()

    def gate_up_back(gate, up):
        return torch.cat([gate, up], 0).contiguous()

    p = "model.layers.{i}."
    out = [
        Rule(
            "embedding.word_embeddings.weight",
            ("model.embed_tokens.weight",),
            _same,
            _ident,
            layered=False,
        ),
        Rule(
            L + "self_attention.linear_qkv.layer_norm_weight",
            (p + "input_layernorm.weight",),
            _same,
            _ident,
        ),
        Rule(
            L + "self_attention.linear_qkv.weight",
            (
                p + "self_attn.q_proj.weight",
                p + "self_attn.k_proj.weight",
                p + "self_attn.v_proj.weight",
            ),
            qkv,
            qkv_back,
        ),
        Rule(
            L + "self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",), _same, _ident
        ),
        Rule(
            L + "mlp.linear_fc1.layer_norm_weight",
            (p + "post_attention_layernorm.weight",),
            _same,
            _ident,
        ),
        Rule(
            L + "mlp.linear_fc1.weight",
            (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            gate_up,
            gate_up_back,
        ),
        Rule(L + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), _same, _ident),
        Rule(
            "decoder.final_layernorm.weight", ("model.norm.weight",), _same, _ident, layered=False
        ),
    ]
    if not model.tie_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), _same, _ident, layered=False))
    if model.qk_norm:  # Qwen3: per-head RMSNorm weights, [head_dim] each, shared by the heads
        out += [
            Rule(
                L + "self_attention.q_layernorm.weight",
                (p + "self_attn.q_norm.weight",),
                _same,
                _ident,
            ),
            Rule(
                L + "self_attention.k_layernorm.weight",
                (p + "self_attn.k_norm.weight",),
                _same,
                _ident,
            ),
        ]
    if model.bias:
        out += [
            Rule(
                L + "self_attention.linear_qkv.bias",
                (
                    p + "self_attn.q_proj.bias",
                    p + "self_attn.k_proj.bias",
                    p + "self_attn.v_proj.bias",
                ),
                qkv,
                qkv_back,
            ),
            Rule(
                L + "self_attention.linear_proj.bias", (p + "self_attn.o_proj.bias",), _same, _ident
            ),
            Rule(
                L + "mlp.linear_fc1.bias",
                (p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"),
                gate_up,
                gate_up_back,
            ),
            Rule(L + "mlp.linear_fc2.bias", (p + "mlp.down_proj.bias",), _same, _ident),
        ]
    return out


def expected_shape(key: str, model: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    """The global shape a checkpoint of ``model`` stores under ``key``."""
    d = Dims.of(model)
    fc1 = d.ffn * (2 if model.ffn == "swiglu" else 1)
    qkv = (d.heads + 2 * d.groups) * d.head_dim
    per_layer = {
        "self_attention.linear_qkv.layer_norm_weight": (d.hidden,),
        "self_attention.linear_qkv.layer_norm_bias": (d.hidden,),
        "self_attention.linear_qkv.weight": (qkv, d.hidden),
        "self_attention.linear_qkv.bias": (qkv,),
        "self_attention.linear_proj.weight": (d.hidden, d.heads * d.head_dim),
        "self_attention.linear_proj.bias": (d.hidden,),
        "mlp.linear_fc1.layer_norm_weight": (d.hidden,),
        "mlp.linear_fc1.layer_norm_bias": (d.hidden,),
        "mlp.linear_fc1.weight": (fc1, d.hidden),
        "mlp.linear_fc1.bias": (fc1,),
        "mlp.linear_fc2.weight": (d.hidden, d.ffn),
        "mlp.linear_fc2.bias": (d.hidden,),
        "self_attention.q_layernorm.weight": (d.head_dim,),
        "self_attention.q_layernorm.bias": (d.head_dim,),
        "self_attention.k_layernorm.weight": (d.head_dim,),
        "self_attention.k_layernorm.bias": (d.head_dim,),
    }
    if key.startswith("decoder.layers."):
        return (d.num_layers, *per_layer[key.removeprefix("decoder.layers.")])
    return {
        "embedding.word_embeddings.weight": (padded_vocab, d.hidden),
        "embedding.position_embeddings.weight": (model.seq_length, d.hidden),
        "output_layer.weight": (padded_vocab, d.hidden),
        "decoder.final_layernorm.weight": (d.hidden,),
        "decoder.final_layernorm.bias": (d.hidden,),
    }[key]


def hf_names(rule: Rule, layer: int | None) -> list[str]:
    return [n.format(i=layer) for n in rule.hf]


def iter_hf_tensors(rule: Rule, stacked: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors one megatron checkpoint tensor maps to."""
    if not rule.layered:
        yield from zip(hf_names(rule, None), rule.to_hf(stacked), strict=True)
        return
    for i in range(stacked.shape[0]):
        yield from zip(hf_names(rule, i), rule.to_hf(stacked[i]), strict=True)
