"""The parts of a decoder a learning-rate group can name, and what each covers (pure logic).

A part is a set of elements of megatron-core parameters: ``q``, ``k``, ``v`` are row blocks of a
layer's fused ``linear_qkv``; ``gate`` and ``up`` the two halves of a gated ``linear_fc1``; the
others whole tensors. Layer parts are selected per layer; ``embedding`` and ``output`` belong to
the model. ``atoms`` splits a part into the pieces that cannot overlap partially, so two groups
overlap exactly when their atoms on a layer intersect.
"""

from __future__ import annotations

from typing import Literal, Protocol

Part = Literal["q", "k", "v", "o", "gate", "up", "fc1", "fc2", "norm", "embedding", "output"]
LAYER_PARTS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "fc1", "fc2", "norm")
MODEL_PARTS: tuple[str, ...] = ("embedding", "output")
GATED_ONLY: tuple[str, ...] = ("gate", "up")


class ModelShape(Protocol):
    """The model fields the element counts read (a recipe's ``model:`` section)."""

    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None
    ffn: str
    norm: str
    bias: bool
    qk_norm: bool
    seq_length: int
    position: str

    @property
    def ffn_size(self) -> int: ...


def atoms(part: str, gated: bool) -> set[str]:
    """The non-overlapping pieces ``part`` covers: ``fc1`` of a gated FFN is its gate and up."""
    if part == "fc1" and gated:
        return {"gate", "up"}
    return {part}


def layer_elements(part: str, m: ModelShape) -> int:
    """Elements of ``part`` in one layer (over all TP ranks; biases included)."""
    h, heads = m.hidden_size, m.num_attention_heads
    head_dim, groups, f, b = h // heads, m.num_query_groups or heads, m.ffn_size, int(m.bias)
    gated = m.ffn == "swiglu"
    per_norm = 2 if m.norm == "layernorm" else 1  # weight (and bias)
    qk_norms = 2 * head_dim * per_norm if m.qk_norm else 0  # one per-head norm each for Q and K
    return {
        "q": heads * head_dim * (h + b),
        "k": groups * head_dim * (h + b),
        "v": groups * head_dim * (h + b),
        "o": h * heads * head_dim + b * h,
        "gate": f * (h + b) if gated else 0,
        "up": f * (h + b) if gated else 0,
        "fc1": f * (h + b) * (2 if gated else 1),
        "fc2": h * f + b * h,
        "norm": 2 * h * per_norm + qk_norms,
    }[part]


def model_elements(part: str, m: ModelShape, vocab_rows: int) -> int:
    """Elements of ``embedding`` or ``output`` (``vocab_rows``: the padded vocabulary)."""
    if part == "output":
        return vocab_rows * m.hidden_size
    return (vocab_rows + (m.seq_length if m.position == "learned" else 0)) * m.hidden_size
