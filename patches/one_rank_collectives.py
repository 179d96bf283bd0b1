"""Collectives over a group of one rank, done in place instead of through gloo.

Over one rank an all-reduce (sum, average, min, max, product), reduce-scatter, all-gather or
broadcast is the identity. gloo still runs each one on its own worker threads, and the copies it
makes there are large enough for ATen to start an OpenMP team on that thread. From then on the
process has more OpenMP threads than CPUs, and libgomp throttles every team's spin-wait: the
training thread's OpenMP workers sleep between operators and are woken (a futex round trip) at
each of the few thousand parallel regions of a step. On the 2-core CPU, tiny/gpt with
DP = TP = PP = 1 (megatron-core still reduce-scatters and all-gathers its whole gradient and
parameter buffers over the one-rank data-parallel group) ran 214 ms a step before, 175 after.

The results are the same bits: nothing is reduced with anything. Applied only for gloo; groups of
two or more ranks are untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_applied = False
_IDENTITY_OPS = (
    dist.ReduceOp.SUM,
    dist.ReduceOp.AVG,
    dist.ReduceOp.MIN,
    dist.ReduceOp.MAX,
    dist.ReduceOp.PRODUCT,
)


class _Done:
    """The handle an ``async_op=True`` call returns: already complete."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True


def _one_rank(group) -> bool:
    return (group.size() if group is not None else dist.get_world_size()) == 1


def _done(async_op: bool) -> _Done | None:
    return _Done() if async_op else None


def _copy_unless_same(output: torch.Tensor, input: torch.Tensor) -> None:
    if output.data_ptr() != input.data_ptr():
        output.copy_(input.view_as(output))


def _wrap_all_reduce(original):
    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op in _IDENTITY_OPS and _one_rank(group):
            return _done(async_op)
        return original(tensor, op=op, group=group, async_op=async_op)

    return all_reduce


def _wrap_reduce_scatter(original):
    def reduce_scatter(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op in _IDENTITY_OPS and _one_rank(group):
            _copy_unless_same(output, input)
            return _done(async_op)
        return original(output, input, op=op, group=group, async_op=async_op)

    return reduce_scatter


def _wrap_all_gather(original):
    def all_gather(output_tensor, input_tensor, group=None, async_op=False):
        if _one_rank(group):
            _copy_unless_same(output_tensor, input_tensor)
            return _done(async_op)
        return original(output_tensor, input_tensor, group=group, async_op=async_op)

    return all_gather


def _wrap_broadcast(original):
    def broadcast(tensor, src=None, group=None, async_op=False, group_src=None):
        if _one_rank(group):
            return _done(async_op)
        return original(tensor, src=src, group=group, async_op=async_op, group_src=group_src)

    return broadcast


def apply() -> None:
    """Patch torch.distributed and the names megatron-core bound at import; idempotent."""
    global _applied
    if _applied:
        return
    # deferred: megatron-core is slow to import; only applying the patch needs it
    from megatron.core.distributed import param_and_grad_buffer

    wrappers = {
        "all_reduce": _wrap_all_reduce,
        "reduce_scatter_tensor": _wrap_reduce_scatter,
        "_reduce_scatter_base": _wrap_reduce_scatter,
        "all_gather_into_tensor": _wrap_all_gather,
        "_all_gather_base": _wrap_all_gather,
        "broadcast": _wrap_broadcast,
    }
    originals = {name: getattr(dist, name) for name in wrappers}
    for name, wrap in wrappers.items():
        setattr(dist, name, wrap(originals[name]))
    # megatron-core's grad and param buffers call these through module globals bound at import
    for name in ("dist_reduce_scatter_func", "dist_all_gather_func"):
        bound = getattr(param_and_grad_buffer, name)
        match = next((n for n, f in originals.items() if f is bound), None)
        if match is not None:
            setattr(param_and_grad_buffer, name, getattr(dist, match))
    _applied = True
