"""Learning-rate groups of any part of any layer, inside megatron-core's and DeepSpeed's optimizers.

megatron-core fuses Q, K and V into one ``linear_qkv`` parameter and gate and up into one
``linear_fc1``, so those parts cannot sit in param groups of their own; and its param groups
follow one schedule. This module registers *scaling groups* on the inner torch optimizer of any
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

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from slowqk.lr_groups.main_params import iter_main_params
from slowqk.lr_groups.params import find_part_params
from slowqk.lr_groups.rows import Block, RowRuns, row_blocks
from slowqk.qk.parts import MODEL_PARTS


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
