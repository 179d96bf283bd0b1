"""The parameters of megatron-core models a learning-rate group can name, as this rank holds them,
with the rows each part covers (Q/K/V of the fused ``linear_qkv``, gate/up of a gated
``linear_fc1``, whole tensors otherwise). Layers are numbered globally (1-based
``layer_number`` under pipeline and virtual pipeline parallelism), so selections hold on every
stage."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_layer import TransformerLayer

from slowqk.lr_groups.rows import FusedQKVLayout, GatedFC1Layout, RowRuns


@dataclass
class QKVParam:
    """A selected layer's fused QKV weight or bias, as held by this rank."""

    param: torch.nn.Parameter
    layer: int  # 0-based global layer index
    layout: FusedQKVLayout
    row_len: int
    tp_rank: int
    tp_size: int


def _qkv_layout(attn) -> FusedQKVLayout:
    cfg = attn.config
    groups = cfg.num_query_groups or cfg.num_attention_heads
    return FusedQKVLayout(
        num_query_groups=groups,
        heads_per_group=cfg.num_attention_heads // groups,
        head_dim=cfg.kv_channels,
    )


def _shape(p: torch.nn.Parameter) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the full shape aside


def _layers(model_chunks: Iterable[torch.nn.Module]):
    """``(0-based global layer index, TransformerLayer)``: ``layer_number`` is global (1-based)
    under pipeline parallelism, so selections are made on global indices on every stage."""
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                yield module.layer_number - 1, module


def find_qkv_params(model_chunks: Iterable[torch.nn.Module], layers: set[int]) -> list[QKVParam]:
    """The ``linear_qkv`` weight/bias of every selected layer, with its global layer index."""
    found: list[QKVParam] = []
    tp_size, tp_rank = _tp_size_rank()
    for layer, module in _layers(model_chunks):
        if layer not in layers:
            continue
        attn = module.self_attention
        layout = _qkv_layout(attn)
        weight = attn.linear_qkv.weight
        found.append(QKVParam(weight, layer, layout, _shape(weight)[1], tp_rank, tp_size))
        bias = getattr(attn.linear_qkv, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            found.append(QKVParam(bias, layer, layout, 1, tp_rank, tp_size))
    return found


@dataclass
class PartParam:
    """One parameter as held by this rank, and the local rows each part it belongs to covers."""

    param: torch.nn.Parameter
    layer: int | None  # 0-based global layer index; None for embedding/output
    rows: dict[str, RowRuns]
    row_len: int


_NORM_SUFFIXES = ("layer_norm_weight", "layer_norm_bias")  # Transformer Engine's fused norms


def _layer_part_params(
    layer: int, module: torch.nn.Module, tp_rank: int, tp_size: int
) -> list[PartParam]:
    out = []
    attn, mlp = module.self_attention, module.mlp
    qkv_layout = _qkv_layout(attn)
    gated = attn.config.gated_linear_unit
    for name, p in module.named_parameters():
        shape = _shape(p)
        rows_here, row_len = shape[0], max(1, math.prod(shape) // shape[0])
        whole = [(0, rows_here)]
        leaf = name.rsplit(".", 1)[-1]
        if "layernorm" in name or leaf in _NORM_SUFFIXES:
            rows = {"norm": whole}
        elif p is getattr(attn.linear_qkv, leaf, None):
            rows = {kind: qkv_layout.local_rows(kind, tp_rank, tp_size) for kind in ("q", "k", "v")}
        elif p is getattr(attn.linear_proj, leaf, None):
            rows = {"o": whole}
        elif p is getattr(mlp.linear_fc1, leaf, None):
            rows = {"fc1": whole}
            if gated:
                layout = GatedFC1Layout(attn.config.ffn_hidden_size)
                rows.update(
                    {kind: layout.local_rows(kind, tp_rank, tp_size) for kind in ("gate", "up")}
                )
        elif p is getattr(mlp.linear_fc2, leaf, None):
            rows = {"fc2": whole}
        else:
            raise ValueError(
                f"layer {layer}: parameter {name} belongs to no part the learning-rate groups know"
            )
        out.append(PartParam(p, layer, rows, row_len))
    return out


def find_part_params(model_chunks: Iterable[torch.nn.Module]) -> list[PartParam]:
    """Every parameter a group can name (the final norm is in no part), with its parts' rows."""
    chunks = list(model_chunks)
    tp_size, tp_rank = _tp_size_rank()
    found = [
        pp
        for layer, module in _layers(chunks)
        for pp in _layer_part_params(layer, module, tp_rank, tp_size)
    ]
    for chunk in chunks:
        for gpt in (m for m in chunk.modules() if isinstance(m, GPTModel)):
            tied = gpt.share_embeddings_and_output_weights
            named = [
                (getattr(getattr(gpt, "embedding", None), attr, None), "embedding")
                for attr in ("word_embeddings", "position_embeddings")
            ]
            # tied under PP: the last stage's copy of the embedding must move with it
            named.append((getattr(gpt, "output_layer", None), "embedding" if tied else "output"))
            for module, part in named:
                p = getattr(module, "weight", None) if module is not None else None
                if isinstance(p, torch.nn.Parameter) and not (
                    part == "embedding" and any(f.param is p for f in found)
                ):
                    shape = _shape(p)
                    found.append(
                        PartParam(p, None, {part: [(0, shape[0])]}, math.prod(shape) // shape[0])
                    )
    return found


def _tp_size_rank() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
