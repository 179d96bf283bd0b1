"""The Q/K learning-rate multiplier over optimizer steps (pure; no framework code).

Hold at ``mult`` for ``hold`` steps, then return to 1.0 over ``ramp`` steps with the given shape.
A function of the step alone, so a resumed run gets the same multipliers as an uninterrupted one.
The multiplier composes with the base LR schedule: effective lr = base_lr(step) * mult(step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Shape = Literal["linear", "cosine", "step"]


@dataclass(frozen=True)
class MultiplierSchedule:
    mult: float
    hold_steps: int
    ramp_steps: int
    shape: Shape = "linear"

    def __post_init__(self) -> None:
        if self.mult < 0:
            raise ValueError(f"multiplier must be >= 0, got {self.mult}")
        if self.hold_steps < 0 or self.ramp_steps < 0:
            raise ValueError(f"hold/ramp must be >= 0, got {self.hold_steps}/{self.ramp_steps}")

    @property
    def end_step(self) -> int:
        """First step at which the multiplier is exactly 1.0 for good."""
        if self.mult == 1.0:
            return 0
        return self.hold_steps + (0 if self.shape == "step" else self.ramp_steps)

    def __call__(self, step: int) -> float:
        """Multiplier for the update made at optimizer step ``step`` (0-based)."""
        if step < self.hold_steps:
            return self.mult
        if self.shape == "step" or step >= self.hold_steps + self.ramp_steps:
            return 1.0
        t = (step - self.hold_steps + 1) / (self.ramp_steps + 1)  # in (0, 1): never repeats mult
        if self.shape == "cosine":
            t = 0.5 * (1.0 - math.cos(math.pi * t))
        return self.mult + (1.0 - self.mult) * t


def to_steps(amount: float, unit: str, total_steps: int, tokens_per_step: int) -> int:
    """Convert a hold/ramp length given in ``unit`` (fraction | steps | tokens) into steps.

    One convention for every unit: the nearest whole number of steps, halves rounded up
    (``fraction`` 0.04 of 137 steps = 5.48 -> 5; ``tokens`` 2.5 steps' worth -> 3).
    """
    if unit == "fraction":
        exact = amount * total_steps
    elif unit == "steps":
        if amount != int(amount):
            raise ValueError(f"a length in steps must be a whole number, got {amount}")
        return int(amount)
    elif unit == "tokens":
        exact = amount / tokens_per_step
    else:
        raise ValueError(f"unknown unit {unit!r}; expected fraction, steps or tokens")
    return math.floor(exact + 0.5 + 1e-9)  # 1e-9: 0.04 * 300 is 12.000000000000002 in floats
