"""Fault injection for the fault-tolerance tests (:mod:`slowqk.faults`' variables): NaN losses on
chosen steps, rank 0 killed after a chosen step. Does nothing unless a variable is set."""

from __future__ import annotations

from slowqk import faults
from slowqk.callbacks.base import Callback


class FaultInjection(Callback):
    def __init__(self, nan_steps: set[int]) -> None:
        self.nan_steps = nan_steps

    @classmethod
    def build(cls, trainer) -> FaultInjection:
        return cls(faults.nan_steps())

    def on_step_start(self, trainer, rec: dict) -> None:
        trainer.engine.poison_loss = trainer.step in self.nan_steps

    def before_update(self, trainer, rec: dict) -> None:
        trainer.engine.poison_loss = False

    def on_step_end(self, trainer, rec: dict) -> None:
        faults.kill_at_step(trainer.step, trainer.rank)
