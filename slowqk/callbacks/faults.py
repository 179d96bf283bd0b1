"""Fault injection for the fault-tolerance tests (:mod:`slowqk.faults`' variables): NaN losses on
chosen steps, rank 0 killed after a chosen step. Does nothing unless a variable is set."""

from __future__ import annotations

from slowqk import faults
from slowqk.callbacks.base import Callback


class FaultInjection(Callback):
    """A NaN loss on the chosen steps: the engine's loss function poisoned for the step's
    forward/backward (so its gradients are NaN too), restored before the update."""

    name = "faults"

    def __init__(self, nan_steps: set[int]) -> None:
        self.nan_steps = nan_steps
        self._clean_loss_fn = None

    @classmethod
    def build(cls, trainer) -> FaultInjection:
        return cls(faults.nan_steps())

    def on_step_start(self, trainer, rec: dict) -> None:
        if trainer.step in self.nan_steps:
            self._clean_loss_fn = clean = trainer.engine.loss_fn
            trainer.engine.loss_fn = lambda mask, output: clean(mask, output) * float("nan")

    def before_update(self, trainer, rec: dict) -> None:
        if self._clean_loss_fn is not None:
            trainer.engine.loss_fn, self._clean_loss_fn = self._clean_loss_fn, None

    def on_step_end(self, trainer, rec: dict) -> None:
        faults.kill_at_step(trainer.step, trainer.rank)
