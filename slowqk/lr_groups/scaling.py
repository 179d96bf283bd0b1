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
is two such groups. A group with a head rule (QuacK, :mod:`slowqk.lr_groups.head_rule`) has one
multiplier per attention head instead, computed in the pre-step hook from the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from slowqk.lr_groups.head_rule import HeadKey, QuacKRule
from slowqk.lr_groups.main_params import iter_main_params
from slowqk.lr_groups.params import find_part_params, find_qkv_params
from slowqk.lr_groups.rows import Block, RowRuns, row_blocks
from slowqk.qk.parts import MODEL_PARTS


@dataclass(frozen=True)
class GroupSpec:
    """A group: ``parts`` of ``layers`` (0-based global; model parts ignore them) at
    ``schedule(step)`` x the learning rate; with ``quack_tau``, each Q and K head at its QuacK
    multiplier instead (``parts`` q and k)."""

    name: str
    parts: frozenset[str]
    layers: frozenset[int]
    schedule: Callable[[int], float]
    quack_tau: float | None = None

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
    # a head rule's groups: each block's head, and each block's multiplier of this step
    keys: list[list[HeadKey]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @property
    def layers(self) -> set[int]:
        return {key[1] for keys in self.keys for key in keys}

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
        self,
        specs: list[GroupSpec],
        held: dict[torch.optim.Optimizer, dict[str, _Scaled]],
        rules: dict[str, QuacKRule] | None = None,
    ) -> None:
        self.specs = {s.name: s for s in specs}
        self._held = held
        self.rules = rules or {}
        # each head's multiplier of this step on this rank (a head rule's groups), computed once
        # per step: DeepSpeed steps its inner optimizer once per param group, and the weights
        # its first call updated must not feed the second call's norms
        self.head_mults: dict[str, dict[HeadKey, float]] = {name: {} for name in self.rules}
        self._head_layers: dict[str, set[int]] = {name: set() for name in self.rules}
        self.mults = {s.name: 1.0 for s in specs if s.name not in self.rules}
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
        return bool(self.rules) or any(m != 1.0 for m in self.mults.values())

    def set_step(self, step: int) -> dict[str, float]:
        """The scheduled groups' multipliers of ``step`` (a head rule's are computed in the first
        pre-step hook after this call); call before every step."""
        self.mults = {name: float(self.specs[name].schedule(step)) for name in self.mults}
        for name in self.rules:
            self.head_mults[name] = {}
            self._head_layers[name] = set()
        return dict(self.mults)

    def _head_weights(self, name: str, scaled: _Scaled) -> list[float]:
        """Each block's multiplier this step, its heads' norms taken once per step."""
        todo = scaled.layers - self._head_layers[name]
        if todo:
            self.head_mults[name].update(self.rules[name].multipliers(todo))
            self._head_layers[name] |= todo
        mults = self.head_mults[name]
        return [mults[key] for keys in scaled.keys for key in keys]

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
                    if name in self.rules:  # from the weights this step's forward used
                        scaled.weights = self._head_weights(name, scaled)
                    scaled.taken = name in self.rules or self.mults[name] != 1.0
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
                    if not scaled.taken:
                        continue
                    views, snaps = scaled.views(), scaled.snapshot
                    # p = old + mult * (new - old) = lerp(new, old, 1 - mult), in place on the
                    # main-param views: one pass over the elements instead of three
                    if name in self.rules:  # one multiplier per block (each in one head)
                        _lerp_each(views, snaps, [1.0 - m for m in scaled.weights])
                    else:
                        torch._foreach_lerp_(views, snaps, 1.0 - self.mults[name])
                    scaled.taken = False
            self.seconds += time.perf_counter() - start

        return post_hook


def _lerp_each(views: list[torch.Tensor], snaps: list[torch.Tensor], weights: list[float]) -> None:
    """``views[i] = lerp(views[i], snaps[i], weights[i])`` in place, in one call where torch has
    the scalar-list overload."""
    try:
        torch._foreach_lerp_(views, snaps, weights)
    except (TypeError, RuntimeError):  # older torch: one tensor at a time
        for view, snap, w in zip(views, snaps, weights, strict=True):
            view.lerp_(snap, w)


def register(
    megatron_optimizer, model_chunks: Iterable[torch.nn.Module], specs: list[GroupSpec]
) -> LRGroups:
    """Register scaling groups ``specs`` on the optimizer (names unique, elements in one group)."""
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"group names must be unique, got {[s.name for s in specs]}")
    chunks = list(model_chunks)
    # per model parameter: (group, rows, row length, the rows' head for a head rule's group)
    targets: dict[int, list[tuple[str, RowRuns, int, HeadKey | None]]] = {}
    for pp in find_part_params(chunks):
        for part, rows in pp.rows.items():
            owners = [s.name for s in specs if s.covers(pp.layer, part) and s.quack_tau is None]
            for name in owners:
                targets.setdefault(id(pp.param), []).append((name, rows, pp.row_len, None))
    rules: dict[str, QuacKRule] = {}
    for spec in (s for s in specs if s.quack_tau is not None):
        qkv = find_qkv_params(chunks, set(spec.layers))
        rules[spec.name] = QuacKRule(qkv, spec.quack_tau)
        for p in qkv:
            for kind in sorted(spec.parts):
                for (group, head), run in p.layout.head_rows(kind, p.tp_rank, p.tp_size):
                    key = (kind, p.layer, group, head)
                    targets.setdefault(id(p.param), []).append((spec.name, [run], p.row_len, key))
    held: dict[torch.optim.Optimizer, dict[str, _Scaled]] = {}
    for inner, model_param, main_param, lo, hi in iter_main_params(megatron_optimizer):
        for name, rows, row_len, key in targets.get(id(model_param), []):
            blocks = row_blocks(rows, row_len, lo, hi)
            if not blocks:
                continue
            scaled = held.setdefault(inner, {}).setdefault(name, _Scaled())
            if key is not None and scaled.main_params and scaled.main_params[-1] is main_param:
                scaled.blocks[-1].extend(blocks)  # another head of the same parameter
                scaled.keys[-1].extend([key] * len(blocks))
                continue
            scaled.main_params.append(main_param)
            scaled.blocks.append(blocks)
            if key is not None:
                scaled.keys.append([key] * len(blocks))
    return LRGroups(specs, held, rules)
