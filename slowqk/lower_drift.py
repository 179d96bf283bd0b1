"""Measure the lower layers' drift around the optimizer step (the adaptive release's signal).

``drift = ||dW||_F / (lr * ||W||_F)`` over the weight matrices of the given layers, where ``W`` are
the fp32 main parameters the optimizer updates (megatron-core's, shards of its distributed
optimizer, or DeepSpeed ZeRO partitions) and ``dW`` is one step's update. Each element is counted
once over all ranks (tensor-parallel pieces and optimizer shards add up; data-parallel replicas
count on DP rank 0 only), and the two sums are reduced over the whole world in one float64
all-reduce, so every rank and every layout sees the same number up to summation order.

Cost while armed: one copy of this rank's share of the lower layers' matrices, one subtraction
and two norms per step. Unarmed steps cost nothing; the trainer stops arming once the decision is
made.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.transformer_layer import TransformerLayer

from slowqk.lr_groups import iter_main_params


def _is_matrix(param: torch.nn.Parameter) -> bool:
    return len(getattr(param, "ds_shape", param.shape)) >= 2  # ZeRO-3 keeps the full shape aside


def layer_of_params(modules: Iterable[torch.nn.Module]) -> dict[int, int]:
    """``id(parameter) -> 0-based global layer index`` for every transformer layer's parameters."""
    return {
        id(p): m.layer_number - 1
        for module in modules
        for m in module.modules()
        if isinstance(m, TransformerLayer)
        for p in m.parameters()
    }


def optimizer_is_sharded(optimizer) -> bool:
    """True if each data-parallel rank updates its own share (no replicas to skip)."""
    if type(optimizer).__name__.startswith("DeepSpeedZeroOptimizer"):
        return True

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in chained)


def _counts_here(param: torch.nn.Parameter, sharded: bool) -> bool:
    if not param_is_not_tensor_parallel_duplicate(param):
        return False
    if sharded or not ps.model_parallel_is_initialized():
        return True
    return ps.get_data_parallel_rank() == 0


def _sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(tensors)).double().pow(2).sum()


class LowerLayerDrift:
    """``arm()`` before ``optimizer.step()``, ``collect(lr)`` after it (on every rank)."""

    def __init__(
        self, optimizer, model_chunks: Iterable[torch.nn.Module], layers: Iterable[int]
    ) -> None:
        layers = set(layers)
        layer_of = layer_of_params(model_chunks)
        sharded = optimizer_is_sharded(optimizer)
        self._views: dict[torch.optim.Optimizer, list[torch.Tensor]] = {}
        for inner, model_param, main_param, _lo, _hi in iter_main_params(optimizer):
            if (
                layer_of.get(id(model_param)) in layers
                and _is_matrix(model_param)
                and _counts_here(model_param, sharded)
            ):
                self._views.setdefault(inner, []).append(main_param)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self._sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._snapshots: dict[torch.optim.Optimizer, list[torch.Tensor]] = {}
        self._armed = False
        self.seconds = 0.0  # time spent measuring (part of the training time)
        self._handles = []
        for inner in self._views:
            self._handles.append(inner.register_step_pre_hook(self._pre(inner)))
            self._handles.append(inner.register_step_post_hook(self._post(inner)))

    def _pre(self, inner):
        def hook(optimizer, args, kwargs):
            if self._armed:
                start = time.perf_counter()
                with torch.no_grad():
                    self._snapshots[inner] = [v.detach().clone() for v in self._views[inner]]
                self.seconds += time.perf_counter() - start

        return hook

    def _post(self, inner):
        def hook(optimizer, args, kwargs):
            old = self._snapshots.pop(inner, None)
            if not self._armed or old is None:
                return
            start = time.perf_counter()
            with torch.no_grad():
                diffs = torch._foreach_sub([v.detach() for v in self._views[inner]], old)
                self._sums[0] += _sum_sq(diffs).to(
                    self.device
                )  # stays on the device: no sync per tensor
            self.seconds += time.perf_counter() - start

        return hook

    def arm(self) -> None:
        """Before ``optimizer.step()``: the weights' norm now, their update in the step hooks.
        (DeepSpeed ZeRO calls the inner optimizer once per param group, so the hooks may fire
        more than once per step: each call adds only the update it made.)"""
        start = time.perf_counter()
        self._armed = True
        self._snapshots.clear()
        self._sums.zero_()
        with torch.no_grad():
            for views in self._views.values():
                self._sums[1] += _sum_sq([v.detach() for v in views]).to(self.device)
        self.seconds += time.perf_counter() - start

    def collect(self, lr: float) -> float | None:
        """The drift of the step just taken (collective: call on every rank). None if no update
        was made (e.g. a skipped step) or ``lr`` is 0."""
        start = time.perf_counter()
        self._armed = False
        self._snapshots.clear()
        sums = self._sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        update_sq, weight_sq = sums.tolist()
        self.seconds += time.perf_counter() - start
        if weight_sq == 0.0 or lr <= 0.0:
            return None
        return (update_sq / weight_sq) ** 0.5 / lr

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
