"""Early warning for premature upper-layer attention specialization (pure logic).

At each diagnostics probe, with ``E_upper`` and ``E_lower`` the mean normalized attention entropy
of the upper layers (the Q/K selection, ``qk.layers``) and of the layers below them, and ``E(0)``
their values at the run's first probe::

    drop_upper = E_upper(0) - E_upper        drop_lower = E_lower(0) - E_lower

the rule fires when ``drop_upper - drop_lower >= gap`` (``diagnostics.warn_entropy_gap``, default
0.1 of the 0..1 entropy scale) **while the lower layers still drift** (their smoothed drift is
above ``qk.adaptive.threshold`` of its peak: the adaptive release would not yet let go). That is
the paper's failure mode: upper attention sharpening ahead of the layers that feed it, before
those have settled. One log line when a firing episode starts; every firing probe is counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _span(layers: list[int]) -> str:
    return (
        f"{layers[0]}"
        if len(layers) == 1
        else f"{layers[0]}-{layers[-1]}"
        if layers == list(range(layers[0], layers[-1] + 1))
        else ",".join(map(str, layers))
    )


@dataclass
class SpecializationWarning:
    upper: list[int]
    lower: list[int]
    gap: float
    baseline_upper: float | None = None
    baseline_lower: float | None = None
    count: int = 0
    first: dict[str, Any] | None = None
    firing: bool = False

    def check(
        self, step: int, entropy: dict[int, float], lower_drifting: bool
    ) -> dict[str, Any] | None:
        """Feed one probe (per-layer mean entropy); returns the event when the rule fires."""
        if not self.upper or not self.lower:
            return None
        upper, lower = (
            _mean([entropy[i] for i in self.upper]),
            _mean([entropy[i] for i in self.lower]),
        )
        if self.baseline_upper is None:
            self.baseline_upper, self.baseline_lower = upper, lower
            return None
        drop_upper, drop_lower = self.baseline_upper - upper, self.baseline_lower - lower
        fires = lower_drifting and drop_upper - drop_lower >= self.gap
        was_firing, self.firing = self.firing, fires
        if not fires:
            return None
        self.count += 1
        event = {
            "step": step,
            "upper_layers": self.upper,
            "lower_layers": self.lower,
            "entropy_upper": upper,
            "entropy_lower": lower,
            "drop_upper": drop_upper,
            "drop_lower": drop_lower,
            "gap": self.gap,
            "new_episode": not was_firing,
        }
        if self.first is None:
            self.first = event
        return event

    @staticmethod
    def message(event: dict[str, Any]) -> str:
        return (
            f"step {event['step']}: premature upper-layer attention specialization: layers "
            f"{_span(event['upper_layers'])} entropy fell {event['drop_upper']:.3f} (to "
            f"{event['entropy_upper']:.3f}), layers {_span(event['lower_layers'])} only "
            f"{event['drop_lower']:.3f} (to {event['entropy_lower']:.3f}), while the lower layers "
            f"still drift (gap >= {event['gap']})"
        )

    def record(self) -> dict[str, Any]:
        return {
            "fired": self.count > 0,
            "probes_firing": self.count,
            "first": self.first,
            "gap": self.gap,
        }

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("baseline_upper", "baseline_lower", "count", "first", "firing"):
            setattr(self, key, state[key])
