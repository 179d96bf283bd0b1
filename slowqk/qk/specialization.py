"""When each layer's attention specializes: the probe steps (log-spaced early, then every N) and
the first probe at which a layer's normalized attention entropy falls below each threshold."""

from __future__ import annotations

from typing import Any


def probe_steps(interval: int, log_spaced: bool, extra: list[int]) -> frozenset[int]:
    """The probe steps besides every ``interval``-th: 1, 2, 4, 8, ... below ``interval`` when
    ``log_spaced``, and ``extra``."""
    steps = set(extra)
    if log_spaced:
        s = 1
        while s < interval:
            steps.add(s)
            s *= 2
    return frozenset(steps)


class SpecializationSteps:
    """Per threshold and layer, the first probe step whose entropy is below the threshold, and
    the mean of the upper layers' steps minus the lower layers' (positive: the upper layers
    specialized later)."""

    def __init__(self, thresholds: list[float], upper: list[int], lower: list[int]) -> None:
        self.thresholds, self.upper, self.lower = list(thresholds), list(upper), list(lower)
        self.first: dict[float, dict[int, int]] = {t: {} for t in self.thresholds}
        self.last_probe: int | None = None

    def update(self, step: int, entropy: dict[int, float]) -> None:
        self.last_probe = step if self.last_probe is None else max(self.last_probe, step)
        for t in self.thresholds:
            for layer, value in entropy.items():
                if value < t and layer not in self.first[t]:
                    self.first[t][layer] = step

    def gap(self, threshold: float, censored: bool = False) -> float | None:
        """Upper minus lower mean specialization step, where every one of them has crossed; with
        ``censored``, a layer that has not crossed counts as crossing at the last probe (a lower
        bound on its step)."""
        first = dict(self.first[threshold])
        if not self.upper or not self.lower:
            return None
        if censored and self.last_probe is not None:
            for layer in self.upper + self.lower:
                first.setdefault(layer, self.last_probe)
        if not all(layer in first for layer in self.upper + self.lower):
            return None
        upper = sum(first[layer] for layer in self.upper) / len(self.upper)
        lower = sum(first[layer] for layer in self.lower) / len(self.lower)
        return upper - lower

    def record(self, num_layers: int) -> dict[str, Any]:
        return {
            "thresholds": self.thresholds,
            "steps": {
                str(t): [self.first[t].get(layer) for layer in range(num_layers)]
                for t in self.thresholds
            },
            "upper_minus_lower": {str(t): self.gap(t) for t in self.thresholds},
            # layers not crossed by the last probe counted at it, and how many those are
            "upper_minus_lower_censored": {str(t): self.gap(t, True) for t in self.thresholds},
            "uncrossed": {str(t): num_layers - len(self.first[t]) for t in self.thresholds},
            "last_probe": self.last_probe,
            "upper": self.upper,
            "lower": self.lower,
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            str(t): {str(k): v for k, v in f.items()} for t, f in self.first.items()
        }
        state["last_probe"] = self.last_probe
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for t in self.thresholds:
            self.first[t] = {int(k): v for k, v in state.get(str(t), {}).items()}
        self.last_probe = state.get("last_probe")
