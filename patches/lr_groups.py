"""Learning-rate groups of any part of any layer, inside megatron-core's and DeepSpeed's optimizers.

megatron-core fuses Q, K and V into one ``linear_qkv`` parameter and gate and up into one
``linear_fc1``, so those parts cannot sit in param groups of their own; and its param groups
follow one schedule. This patch registers *scaling groups* on the inner torch optimizer of any
megatron-core optimizer (``FP32Optimizer``, ``Float16OptimizerWithFloat16Params``,
``DistributedOptimizer``, ``ChainedOptimizer``) or DeepSpeed ZeRO optimizer (stages 1-3): for each
group it knows which elements of each fp32 main parameter (or shard, or ZeRO partition) it covers
(row blocks of fused weights, whole tensors), and around ``optimizer.step()`` rescales just
their update with the group's multiplier of the step::

    p <- p_old + mult * (p_stepped - p_old)

For optimizers whose update is linear in the learning rate (SGD with momentum, Adam, AdamW: the
moments do not depend on lr) this equals giving those elements ``lr * mult``. Gradient clipping is
unaffected (it happens before the step). Model layout, param groups and checkpoint format are
untouched; while every multiplier is 1 the hooks return at once. The Q/K intervention (``qk:``)
is two such groups.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from slowqk.qk.parts import MODEL_PARTS
from slowqk.qk.selection import Block, FusedQKVLayout, GatedFC1Layout, RowRuns, row_blocks


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
    # deferred: patches load before megatron-core is imported
    from megatron.core.transformer.transformer_layer import TransformerLayer

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
    # deferred: patches load before megatron-core is imported
    from megatron.core.models.gpt import GPTModel

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
    # deferred: patches load before megatron-core is imported
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank(),
    )


def iter_main_params(
    megatron_optimizer,
) -> Iterator[tuple[torch.optim.Optimizer, torch.nn.Parameter, torch.Tensor, int, int]]:
    """Yield ``(inner_optimizer, model_param, main_param, lo, hi)`` for every main parameter.

    ``main_param`` is what the inner torch optimizer updates; it holds the flat element range
    ``[lo, hi)`` of ``model_param``.
    """
    # deferred: patches load before megatron-core is imported
    from megatron.core.optimizer import (
        ChainedOptimizer,
        DistributedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    )

    if type(megatron_optimizer).__name__.startswith("DeepSpeedZeroOptimizer"):
        yield from _iter_deepspeed_partitions(megatron_optimizer)
        return
    if isinstance(megatron_optimizer, ChainedOptimizer):
        for opt in megatron_optimizer.chained_optimizers:
            yield from iter_main_params(opt)
        return
    inner = getattr(megatron_optimizer, "optimizer", None)
    if inner is None:  # a stub optimizer on a rank with nothing to update
        return
    if isinstance(megatron_optimizer, DistributedOptimizer):
        pairs = [
            (
                megatron_optimizer.model_float16_groups,
                megatron_optimizer.shard_fp32_from_float16_groups,
            ),
            (megatron_optimizer.model_fp32_groups, megatron_optimizer.shard_fp32_groups),
        ]
        for model_groups, main_groups in pairs:
            for model_group, main_group in zip(model_groups, main_groups, strict=True):
                for model_param, main_param in zip(model_group, main_group, strict=True):
                    rng = megatron_optimizer._get_model_param_range_map(model_param)["param"]
                    yield inner, model_param, main_param, rng.start, rng.end
    elif isinstance(megatron_optimizer, Float16OptimizerWithFloat16Params):
        for model_group, main_group in zip(
            megatron_optimizer.float16_groups,
            megatron_optimizer.fp32_from_float16_groups,
            strict=True,
        ):
            for model_param, main_param in zip(model_group, main_group, strict=True):
                yield inner, model_param, main_param, 0, model_param.numel()
        for group in megatron_optimizer.fp32_from_fp32_groups:
            for p in group:
                yield inner, p, p, 0, p.numel()
    elif isinstance(megatron_optimizer, FP32Optimizer) or isinstance(inner, torch.optim.Optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                yield inner, p, p, 0, p.numel()
    else:
        raise TypeError(f"unsupported optimizer type {type(megatron_optimizer).__name__}")


def _iter_deepspeed_partitions(
    opt,
) -> Iterator[tuple[torch.optim.Optimizer, torch.nn.Parameter, torch.Tensor, int, int]]:
    """DeepSpeed ZeRO: each rank's fp32 partition is one flat tensor per param group.

    Stages 1/2 flatten the group's parameters in order and give rank r the elements
    ``[r * size, (r + 1) * size)`` of that flat buffer. Stage 3 partitions every parameter: rank r
    holds elements ``[r * n, (r + 1) * n)`` of each (``n = ds_tensor.ds_numel``), and its fp32 flat
    partition concatenates those pieces. Yields views of the flat partition, one per parameter
    piece.
    """
    # deferred: patches load before megatron-core is imported
    import torch.distributed as dist

    inner = opt.optimizer
    if type(opt).__name__ == "DeepSpeedZeroOptimizer_Stage3":
        rank = dist.get_rank(group=opt.dp_process_group)
        for params, flat in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat, strict=True):
            off = 0
            for p in params:
                part = p.ds_tensor.ds_numel
                lo, hi = rank * part, min((rank + 1) * part, p.ds_numel)
                if lo < hi:
                    yield inner, p, flat.data[off : off + hi - lo], lo, hi
                off += part
        return
    for i, params in enumerate(opt.round_robin_bit16_groups):
        rank = dist.get_rank(group=opt.real_dp_process_group[i])
        size = opt.partition_size[i]
        start, flat, off = rank * size, opt.single_partition_of_fp32_groups[i], 0
        for p in params:
            lo, hi = max(off, start), min(off + p.numel(), start + size)
            if lo < hi:
                yield inner, p, flat.data[lo - start : hi - start], lo - off, hi - off
            off += p.numel()


@dataclass(frozen=True)
class GroupSpec:
    """A group: ``parts`` of ``layers`` (0-based global; model parts ignore them) at
    ``schedule(step)`` x the learning rate."""

    name: str
    parts: frozenset[str]
    layers: frozenset[int]
    schedule: Callable[[int], float]

    def covers(self, layer: int | None, part: str) -> bool:
        if part not in self.parts:
            return False
        return part in MODEL_PARTS if layer is None else layer in self.layers


@dataclass
class _Scaled:
    """A group's element views of the main params one inner optimizer updates."""

    main_params: list[torch.Tensor] = field(default_factory=list)
    blocks: list[list[Block]] = field(default_factory=list)
    # the elements before the step; allocated once and reused while the group is active (fresh
    # allocations every step cost more than the copy on CPU), freed once its multiplier is 1
    snapshot: list[torch.Tensor] = field(default_factory=list)
    taken: bool = False

    def views(self) -> list[torch.Tensor]:
        out = []
        for main, blocks in zip(self.main_params, self.blocks, strict=True):
            flat = main.data.view(-1)
            out.extend(b.view(flat) for b in blocks)
        return out


class LRGroups:
    """Scales the update of each group's elements by the group's multiplier of the step.

    Call :meth:`set_step` with the optimizer step about to be taken (0-based); it returns each
    group's multiplier by name. Use :func:`register` to build one.
    """

    def __init__(
        self, specs: list[GroupSpec], held: dict[torch.optim.Optimizer, dict[str, _Scaled]]
    ) -> None:
        self.specs = {s.name: s for s in specs}
        self._held = held
        self.mults = {s.name: 1.0 for s in specs}
        self.seconds = 0.0  # time spent in the hooks while a group is active
        self._handles = []
        for opt, groups in held.items():
            self._handles.append(opt.register_step_pre_hook(self._make_pre(groups)))
            self._handles.append(opt.register_step_post_hook(self._make_post(groups)))

    def num_elements(self, name: str) -> int:
        """Elements of group ``name`` held by this rank's main params."""
        return sum(
            b.numel
            for groups in self._held.values()
            if name in groups
            for blocks in groups[name].blocks
            for b in blocks
        )

    @property
    def active(self) -> bool:
        return any(m != 1.0 for m in self.mults.values())

    def set_step(self, step: int) -> dict[str, float]:
        self.mults = {name: float(spec.schedule(step)) for name, spec in self.specs.items()}
        return dict(self.mults)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_pre(self, groups: dict[str, _Scaled]):
        def pre_hook(optimizer, args, kwargs):
            if not self.active:
                return None
            start = time.perf_counter()
            with torch.no_grad():
                for name, scaled in groups.items():
                    scaled.taken = self.mults[name] != 1.0
                    if not scaled.taken:
                        scaled.snapshot = []
                        continue
                    views = scaled.views()
                    if not scaled.snapshot:
                        scaled.snapshot = [torch.empty_like(v) for v in views]
                    torch._foreach_copy_(scaled.snapshot, views)
            self.seconds += time.perf_counter() - start
            return None

        return pre_hook

    def _make_post(self, groups: dict[str, _Scaled]):
        def post_hook(optimizer, args, kwargs):
            if not self.active:
                return
            start = time.perf_counter()
            with torch.no_grad():
                for name, scaled in groups.items():
                    mult, snaps = self.mults[name], scaled.snapshot
                    if mult == 1.0 or not scaled.taken:
                        continue
                    views = scaled.views()
                    # p = old + mult * (new - old) = lerp(new, old, 1 - mult), in place on the
                    # main-param views: one pass over the elements instead of three
                    torch._foreach_lerp_(views, snaps, 1.0 - mult)
                    scaled.taken = False
            self.seconds += time.perf_counter() - start

        return post_hook


def register(
    megatron_optimizer, model_chunks: Iterable[torch.nn.Module], specs: list[GroupSpec]
) -> LRGroups:
    """Register scaling groups ``specs`` on the optimizer (names unique, elements in one group)."""
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"group names must be unique, got {[s.name for s in specs]}")
    targets: dict[int, list[tuple[str, RowRuns, int]]] = {}
    for pp in find_part_params(model_chunks):
        for part, rows in pp.rows.items():
            owners = [s.name for s in specs if s.covers(pp.layer, part)]
            for name in owners:
                targets.setdefault(id(pp.param), []).append((name, rows, pp.row_len))
    held: dict[torch.optim.Optimizer, dict[str, _Scaled]] = {}
    for inner, model_param, main_param, lo, hi in iter_main_params(megatron_optimizer):
        for name, rows, row_len in targets.get(id(model_param), []):
            blocks = row_blocks(rows, row_len, lo, hi)
            if blocks:
                scaled = held.setdefault(inner, {}).setdefault(name, _Scaled())
                scaled.main_params.append(main_param)
                scaled.blocks.append(blocks)
    return LRGroups(specs, held)
