"""The fp32 main parameters an optimizer updates and which flat element range of each model
parameter they hold: megatron-core's FP32, mixed-precision and distributed optimizers (the
distributed one holds a shard of each parameter), chained ones, and DeepSpeed ZeRO 1-3 (a flat
fp32 partition per param group)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core.optimizer import (
    ChainedOptimizer,
    DistributedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
)

MainParam = tuple[torch.optim.Optimizer, torch.nn.Parameter, torch.Tensor, int, int]


def iter_main_params(
    megatron_optimizer,
) -> Iterator[MainParam]:
    """Yield ``(inner_optimizer, model_param, main_param, lo, hi)`` for every main parameter.

    ``main_param`` is what the inner torch optimizer updates; it holds the flat element range
    ``[lo, hi)`` of ``model_param``.
    """
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
) -> Iterator[MainParam]:
    """DeepSpeed ZeRO: each rank's fp32 partition is one flat tensor per param group.

    Stages 1/2 flatten the group's parameters in order and give rank r the elements
    ``[r * size, (r + 1) * size)`` of that flat buffer. Stage 3 partitions every parameter: rank r
    holds elements ``[r * n, (r + 1) * n)`` of each (``n = ds_tensor.ds_numel``), and its fp32 flat
    partition concatenates those pieces. Yields views of the flat partition, one per parameter
    piece.
    """
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
