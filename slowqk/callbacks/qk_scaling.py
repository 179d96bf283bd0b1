"""The learning-rate groups (the Q/K slowdown among them) and the adaptive release they follow."""

from __future__ import annotations

import logging
from typing import Any

from slowqk.callbacks.base import Callback
from slowqk.optim import (
    build_lr_groups,
    build_release,
    head_multiplier_range,
    lr_groups_record,
    release_record,
    step_multipliers,
)

log = logging.getLogger("slowqk.train")


class QKScaling(Callback):
    """Sets each group's multiplier for the step (``mult_q``, ``mult_k``, ``lr_mult`` in the
    record; a QuacK group's range over its heads after the update). The adaptive release decides
    from the lower layers' drift, which :class:`~slowqk.callbacks.lower_drift.LowerDriftWatch`
    measures and feeds it; its state is saved there, with the drift. State: each QuacK group's
    norms at the start."""

    name = "qk_scaling"

    def __init__(self, recipe, groups, release) -> None:
        self.recipe, self.groups, self.release = recipe, groups, release
        self._loaded: set[str] = set()  # QuacK groups whose start norms came from a checkpoint

    @classmethod
    def build(cls, trainer) -> QKScaling:
        release = build_release(trainer.recipe)
        engine = trainer.engine
        groups = build_lr_groups(trainer.recipe, engine.optimizer, engine.chunks, release)
        for rule in groups.rules.values() if groups is not None else ():
            rule.gather_start()  # every head's, for the checkpoint
        return cls(trainer.recipe, groups, release)

    def on_step_start(self, trainer, rec: dict) -> None:
        rec.update(step_multipliers(self.groups, trainer.step))

    def after_update(self, trainer, rec: dict, updated: bool) -> None:
        if self.groups is not None and self.groups.rules:  # a skipped step has no range
            rec.setdefault("lr_mult", {}).update(head_multiplier_range(self.groups, trainer.device))

    def state_dict(self) -> dict[str, Any]:
        if self.groups is None or not self.groups.rules:
            return {}
        return {"quack": {name: rule.state_dict() for name, rule in self.groups.rules.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rules = self.groups.rules if self.groups is not None else {}
        for name, rule_state in state.get("quack", {}).items():
            if name in rules:
                rules[name].load_state_dict(rule_state)
                self._loaded.add(name)

    def on_resume(self, trainer) -> None:
        rules = self.groups.rules if self.groups is not None else {}
        for name in sorted(set(rules) - self._loaded):  # QuacK added on resume
            rules[name].take_start()
            rules[name].gather_start()
            if trainer.rank == 0:
                log.warning(
                    "lr_groups %s: the checkpoint has no QuacK start norms; the resumed weights' "
                    "norms are the start (the multipliers start at tau here)",
                    name,
                )

    def summary(self) -> dict[str, Any]:
        return {
            "qk_enabled": self.recipe.qk.enabled,
            "qk_release": release_record(self.recipe, self.release),
            "lr_groups": lr_groups_record(self.recipe),
            "lr_groups_seconds": self.groups.seconds if self.groups is not None else 0.0,
        }
