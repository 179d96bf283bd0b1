"""Per-layer Q/K learning-rate scaling groups inside megatron-core's optimizers.

megatron-core fuses Q, K and V into one ``linear_qkv`` parameter, so Q and K cannot sit in param
groups of their own. This patch registers *scaling groups* on the inner torch optimizer of any
megatron-core optimizer (``FP32Optimizer``, ``Float16OptimizerWithFloat16Params``,
``DistributedOptimizer``, ``ChainedOptimizer``): for each selected layer it knows which elements of
each fp32 main parameter (or distributed-optimizer shard) are Q rows and which are K rows, and
around ``optimizer.step()`` rescales just their update::

    p <- p_old + mult * (p_stepped - p_old)

For optimizers whose update is linear in the learning rate (SGD with momentum, Adam, AdamW: the
moments do not depend on lr) this equals giving those rows ``lr * mult``. Gradient clipping is
unaffected (it happens before the step). Model layout, param groups and checkpoint format are
untouched; when both multipliers are 1 the hooks return at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from slowqk.qk.selection import Block, FusedQKVLayout


@dataclass
class QKVParam:
    """A selected layer's fused QKV weight or bias, as held by this rank."""

    param: torch.nn.Parameter
    layer: int  # 0-based global layer index
    layout: FusedQKVLayout
    row_len: int
    tp_rank: int
    tp_size: int


def find_qkv_params(model_chunks: Iterable[torch.nn.Module], layers: set[int]) -> list[QKVParam]:
    """The ``linear_qkv`` weight/bias of every selected layer, with its global layer index.

    ``TransformerLayer.layer_number`` is global (1-based) under pipeline parallelism, so the
    selection is made on global indices whatever stage this rank runs.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    found: list[QKVParam] = []
    for chunk in model_chunks:
        for module in chunk.modules():
            if not isinstance(module, TransformerLayer):
                continue
            layer = module.layer_number - 1
            if layer not in layers:
                continue
            attn = module.self_attention
            cfg = attn.config
            groups = cfg.num_query_groups or cfg.num_attention_heads
            layout = FusedQKVLayout(
                num_query_groups=groups,
                heads_per_group=cfg.num_attention_heads // groups,
                head_dim=cfg.kv_channels,
            )
            tp_size, tp_rank = _tp_size_rank()
            weight = attn.linear_qkv.weight
            shape = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3 keeps the full shape aside
            found.append(QKVParam(weight, layer, layout, shape[1], tp_rank, tp_size))
            bias = getattr(attn.linear_qkv, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                found.append(QKVParam(bias, layer, layout, 1, tp_rank, tp_size))
    return found


def _tp_size_rank() -> tuple[int, int]:
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
            (megatron_optimizer.model_float16_groups, megatron_optimizer.shard_fp32_from_float16_groups),
            (megatron_optimizer.model_fp32_groups, megatron_optimizer.shard_fp32_groups),
        ]
        for model_groups, main_groups in pairs:
            for model_group, main_group in zip(model_groups, main_groups, strict=True):
                for model_param, main_param in zip(model_group, main_group, strict=True):
                    rng = megatron_optimizer._get_model_param_range_map(model_param)["param"]
                    yield inner, model_param, main_param, rng.start, rng.end
    elif isinstance(megatron_optimizer, Float16OptimizerWithFloat16Params):
        for model_group, main_group in zip(
            megatron_optimizer.float16_groups, megatron_optimizer.fp32_from_float16_groups, strict=True
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


def _iter_deepspeed_partitions(opt) -> Iterator[tuple[torch.optim.Optimizer, torch.nn.Parameter, torch.Tensor, int, int]]:
    """DeepSpeed ZeRO: each rank's fp32 partition is one flat tensor per param group.

    Stages 1/2 flatten the group's parameters in order and give rank r the elements
    ``[r * size, (r + 1) * size)`` of that flat buffer. Stage 3 partitions every parameter: rank r
    holds elements ``[r * n, (r + 1) * n)`` of each (``n = ds_tensor.ds_numel``), and its fp32 flat
    partition concatenates those pieces. Yields views of the flat partition, one per parameter piece.
    """
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


@dataclass
class _Views:
    """Q and K element views of one main parameter."""

    main_param: torch.Tensor
    q_blocks: list[Block]
    k_blocks: list[Block]


@dataclass
class _Group:
    views: list[_Views] = field(default_factory=list)
    snapshot_q: list[torch.Tensor] = field(default_factory=list)
    snapshot_k: list[torch.Tensor] = field(default_factory=list)


class QKScaling:
    """Scales the update of the selected layers' Q rows by ``mult_q`` and K rows by ``mult_k``.

    Call :meth:`set_step` with the optimizer step about to be taken (0-based); the schedules map
    it to multipliers. Use :func:`register` to build one.
    """

    def __init__(
        self,
        groups: dict[torch.optim.Optimizer, _Group],
        schedule_q: Callable[[int], float],
        schedule_k: Callable[[int], float],
        layers: list[int],
    ) -> None:
        self._groups = groups
        self.schedule_q = schedule_q
        self.schedule_k = schedule_k
        self.layers = layers
        self.mult_q = 1.0
        self.mult_k = 1.0
        self._handles = []
        for opt, group in groups.items():
            self._handles.append(opt.register_step_pre_hook(self._make_pre(group)))
            self._handles.append(opt.register_step_post_hook(self._make_post(group)))

    @property
    def num_scaled_elements(self) -> tuple[int, int]:
        """(Q elements, K elements) held by this rank's main params."""
        q = sum(b.numel for g in self._groups.values() for v in g.views for b in v.q_blocks)
        k = sum(b.numel for g in self._groups.values() for v in g.views for b in v.k_blocks)
        return q, k

    @property
    def active(self) -> bool:
        return self.mult_q != 1.0 or self.mult_k != 1.0

    def set_step(self, step: int) -> tuple[float, float]:
        self.mult_q = float(self.schedule_q(step))
        self.mult_k = float(self.schedule_k(step))
        return self.mult_q, self.mult_k

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _views(self, group: _Group, kind: str) -> list[torch.Tensor]:
        out = []
        for v in group.views:
            flat = v.main_param.data.view(-1)
            out.extend(b.view(flat) for b in (v.q_blocks if kind == "q" else v.k_blocks))
        return out

    def _make_pre(self, group: _Group):
        def pre_hook(optimizer, args, kwargs):
            if not self.active:
                return None
            with torch.no_grad():
                group.snapshot_q = [t.clone() for t in self._views(group, "q")] if self.mult_q != 1.0 else []
                group.snapshot_k = [t.clone() for t in self._views(group, "k")] if self.mult_k != 1.0 else []
            return None

        return pre_hook

    def _make_post(self, group: _Group):
        def post_hook(optimizer, args, kwargs):
            if not self.active:
                return
            with torch.no_grad():
                for kind, mult, snaps in (("q", self.mult_q, group.snapshot_q), ("k", self.mult_k, group.snapshot_k)):
                    if mult == 1.0 or not snaps:
                        continue
                    views = self._views(group, kind)
                    # p = old + mult * (new - old), in place on the main-param views
                    torch._foreach_sub_(views, snaps)
                    torch._foreach_mul_(views, mult)
                    torch._foreach_add_(views, snaps)
            group.snapshot_q, group.snapshot_k = [], []

        return post_hook


def register(
    megatron_optimizer,
    model_chunks: Iterable[torch.nn.Module],
    layers: Iterable[int],
    schedule_q: Callable[[int], float],
    schedule_k: Callable[[int], float],
) -> QKScaling:
    """Register Q/K scaling groups for ``layers`` (0-based global indices) on the optimizer."""
    layers = sorted(set(layers))
    targets = {id(t.param): t for t in find_qkv_params(list(model_chunks), set(layers))}
    groups: dict[torch.optim.Optimizer, _Group] = {}
    for inner, model_param, main_param, lo, hi in iter_main_params(megatron_optimizer):
        target = targets.get(id(model_param))
        if target is None:
            continue
        kw = dict(row_len=target.row_len, tp_rank=target.tp_rank, tp_size=target.tp_size, lo=lo, hi=hi)
        q_blocks = target.layout.local_blocks("q", **kw)
        k_blocks = target.layout.local_blocks("k", **kw)
        if q_blocks or k_blocks:
            groups.setdefault(inner, _Group()).views.append(_Views(main_param, q_blocks, k_blocks))
    return QKScaling(groups, schedule_q, schedule_k, layers)
