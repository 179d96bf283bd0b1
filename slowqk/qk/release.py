"""When to release the Q/K slowdown: on evidence that the lower layers have settled (pure logic).

The signal (measured by :mod:`slowqk.lower_drift`, documented in the README's diagnostics table) is
the
**lower-layer drift** of each optimizer step: the relative update of the weight matrices of the
layers below the slowed ones, per unit of learning rate::

    drift_t = ||W_t+1 - W_t||_F / (lr_t * ||W_t||_F)

Dividing by the step's learning rate takes the base LR schedule (warmup, decay) out of the signal,
so what is left is how far the optimizer *wants* to move the lower layers: for Adam the norm of
m_hat / sqrt(v_hat) relative to the weights, which shrinks as their gradients turn from a
consistent direction into noise. A :class:`DriftTracker` smooths it (bias-corrected EMA) and calls
the lower layers *settled* the first time the smoothed drift falls to ``threshold`` times its peak.
:class:`AdaptiveRelease` starts the ramp back to 1 at that step, never before ``min_hold`` and at
the latest at ``max_hold``.

Everything here is plain floats with a ``state_dict``: a resumed run makes the same decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slowqk.qk.schedule import MultiplierSchedule, Shape


@dataclass
class DriftTracker:
    """Smoothed lower-layer drift, its peak, and the step at which it first fell below
    ``threshold`` x peak (``settled_at``, latched)."""

    threshold: float
    smoothing: float
    ema: float = 0.0
    count: int = 0
    peak: float = 0.0
    last_drift: float | None = None
    settled_at: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")

    @property
    def smoothed(self) -> float | None:
        if self.count == 0:
            return None
        return self.ema / (1.0 - self.smoothing**self.count)  # bias-corrected, as Adam's moments

    @property
    def ratio(self) -> float | None:
        """Smoothed drift relative to its peak so far (1.0 at the peak)."""
        s = self.smoothed
        return None if s is None or self.peak == 0.0 else s / self.peak

    @property
    def settled(self) -> bool:
        return self.settled_at is not None

    def update(self, steps_done: int, drift: float) -> None:
        """Feed the drift of the update that brought the run to ``steps_done`` steps."""
        if drift < 0 or drift != drift:
            raise ValueError(f"drift must be a finite number >= 0, got {drift}")
        self.last_drift = drift
        self.count += 1
        self.ema = self.smoothing * self.ema + (1.0 - self.smoothing) * drift
        self.peak = max(self.peak, self.smoothed)
        if self.settled_at is None and self.ratio is not None and self.ratio <= self.threshold:
            self.settled_at = steps_done

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("ema", "count", "peak", "last_drift", "settled_at"):
            setattr(self, key, state[key])


@dataclass
class AdaptiveRelease:
    """Hold the multiplier until the lower layers settle (within ``[min_hold, max_hold]`` steps),
    then ramp back to 1 over ``ramp_steps`` with ``shape``, as the fixed schedule does."""

    min_hold: int
    max_hold: int
    ramp_steps: int
    shape: Shape
    tracker: DriftTracker
    release_step: int | None = None
    reason: str | None = None
    ratio_at_release: float | None = None
    _schedules: dict[float, MultiplierSchedule] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.min_hold <= self.max_hold:
            raise ValueError(
                f"need 0 <= min_hold <= max_hold, got {self.min_hold} and {self.max_hold} steps"
            )
        if self.max_hold == 0:
            self._decide(0, "max_hold")

    @property
    def decided(self) -> bool:
        return self.release_step is not None

    def _decide(self, step: int, reason: str) -> None:
        self.release_step, self.reason = step, reason
        self.ratio_at_release = self.tracker.ratio

    def observe(self, steps_done: int, drift: float | None) -> bool:
        """After each optimizer step (``drift`` None when none was measured, e.g. a skipped
        update). True when this call decided the release: updates from step ``steps_done`` on
        follow the ramp."""
        if drift is not None:  # also after the decision: the early warning reads the tracker
            self.tracker.update(steps_done, drift)
        if self.decided:
            return False
        if self.tracker.settled and steps_done >= self.min_hold:
            self._decide(steps_done, "settled")
        elif steps_done >= self.max_hold:
            self._decide(steps_done, "max_hold")
        return self.decided

    def multiplier(self, step: int, mult: float) -> float:
        """The multiplier for the update made at step ``step`` (0-based)."""
        if self.release_step is None:
            return mult
        sched = self._schedules.get(mult)
        if sched is None or sched.hold_steps != self.release_step:
            sched = self._schedules[mult] = MultiplierSchedule(
                mult, self.release_step, self.ramp_steps, self.shape
            )
        return sched(step)

    def schedule(self, mult: float):
        """A step -> multiplier function for :class:`slowqk.lr_groups.LRGroups` group."""
        return lambda step: self.multiplier(step, mult)

    def describe(self) -> str:
        if self.release_step is None:
            return "not yet released"
        ratio = "n/a" if self.ratio_at_release is None else f"{self.ratio_at_release:.3f}"
        if self.reason == "settled":
            return (
                f"lower layers settled at step {self.tracker.settled_at} (smoothed drift {ratio} "
                f"of its peak <= threshold {self.tracker.threshold}); released at step "
                f"{self.release_step}"
                + (
                    f" (min_hold {self.min_hold})"
                    if self.release_step > self.tracker.settled_at
                    else ""
                )
            )
        return (
            f"max_hold reached at step {self.release_step}; the lower layers had not settled "
            f"(smoothed drift {ratio} of its peak > threshold {self.tracker.threshold})"
        )

    def record(self) -> dict[str, Any]:
        """What the run writes down about its release (summary.json, metrics)."""
        return {
            "rule": "adaptive",
            "step": self.release_step,
            "reason": self.reason,
            "ramp_end": None if self.release_step is None else self.release_step + self.ramp_steps,
            "settled_at": self.tracker.settled_at,
            "drift_ratio": self.ratio_at_release,
            "threshold": self.tracker.threshold,
            "min_hold": self.min_hold,
            "max_hold": self.max_hold,
            "why": self.describe(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "release_step": self.release_step,
            "reason": self.reason,
            "ratio_at_release": self.ratio_at_release,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.release_step, self.reason = state["release_step"], state["reason"]
        self.ratio_at_release = state["ratio_at_release"]


def fixed_release_record(hold_steps: int, ramp_steps: int) -> dict[str, Any]:
    return {
        "rule": "fixed",
        "step": hold_steps,
        "reason": "fixed",
        "ramp_end": hold_steps + ramp_steps,
        "why": f"fixed hold of {hold_steps} steps",
    }
