"""Validation as a component of the loop: its schedule and the validation loss."""

from __future__ import annotations

import math

import torch

from slowqk.config import Recipe
from slowqk.engines.common import mean_on_device


class Validator:
    """Mean loss over the first ``train.eval_iters`` validation batches: the same batches every
    time, so validation curves are comparable across steps and runs. Scheduled every
    ``train.eval_interval`` steps, at the last step, and at step 0 with ``train.eval_at_start``."""

    def __init__(self, recipe: Recipe, engine, dataset) -> None:
        t = recipe.train
        self.engine, self.dataset = engine, dataset
        self.iters, self.interval, self.last_step = t.eval_iters, t.eval_interval, t.steps
        self.at_start = t.eval_at_start

    def should_evaluate(self, step: int) -> bool:
        """Whether the loop evaluates once ``step`` updates are done."""
        if step == 0:
            return self.at_start
        return step % self.interval == 0 or step == self.last_step

    def evaluate(self) -> float:
        engine = self.engine
        engine.train_mode(False)
        with torch.no_grad():
            losses = [engine.forward_backward(self.dataset, i, True) for i in range(self.iters)]
        engine.train_mode(True)
        return float(mean_on_device(losses, engine.device))  # one read

    def record(self) -> dict[str, float]:
        """``val_loss`` and ``val_ppl`` for the step's record."""
        loss = self.evaluate()
        return {"val_loss": loss, "val_ppl": perplexity(loss)}


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at exp(50) so a diverged run's loss does not overflow it."""
    return math.exp(min(loss, 50.0))
