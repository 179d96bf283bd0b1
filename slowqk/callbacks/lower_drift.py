"""The lower layers' drift: the adaptive release's signal, and the early warning's "still
moving"."""

from __future__ import annotations

import logging
from typing import Any

from slowqk.callbacks.base import Callback
from slowqk.callbacks.qk_scaling import QKScaling
from slowqk.lower_drift import LowerLayerDrift
from slowqk.optim import drift_tracker, lower_layers

log = logging.getLogger("slowqk.train")


def warning_enabled(recipe) -> bool:
    d = recipe.diagnostics
    return d.interval > 0 and d.warn and bool(lower_layers(recipe))


class LowerDriftWatch(Callback):
    """Measures the drift around each optimizer step until the lower layers settle, and only
    while the release or the early warning needs it; feeds it to the release (or to a tracker of
    its own for the warning). State: ``release`` (the release with its tracker) or ``tracker``."""

    name = "lower_drift"

    def __init__(self, meter: LowerLayerDrift, tracker, release, for_warning: bool) -> None:
        self.meter, self.tracker, self.release = meter, tracker, release
        self.for_warning = for_warning
        self._measuring = False
        self._released_now = False

    @classmethod
    def build(cls, trainer) -> LowerDriftWatch | None:
        release = trainer.callback(QKScaling).release
        for_warning = warning_enabled(trainer.recipe)
        if release is None and not for_warning:
            return None
        tracker = release.tracker if release is not None else drift_tracker(trainer.recipe)
        engine = trainer.engine
        meter = LowerLayerDrift(engine.optimizer, engine.chunks, lower_layers(trainer.recipe))
        return cls(meter, tracker, release, for_warning)

    def _needed(self) -> bool:
        if self.tracker.settled:
            return False
        return self.for_warning or not self.release.decided

    def on_step_start(self, trainer, rec: dict) -> None:
        self._measuring = self._needed()
        if self._measuring:
            self.meter.arm()

    def after_update(self, trainer, rec: dict, updated: bool) -> None:
        drift = self.meter.collect(rec["lr"]) if self._measuring else None  # None if skipped
        if self.release is not None:
            released = self.release.observe(trainer.step, drift)
        else:
            released = False
            if drift is not None:
                self.tracker.update(trainer.step, drift)
        if self._measuring:
            rec["lower_drift"], rec["lower_drift_ratio"] = drift, self.tracker.ratio
        self._released_now = released
        if released:
            rec["qk_release"] = self.release.record()
            if trainer.rank == 0:
                log.info(
                    "qk: release at step %d: %s", self.release.release_step, self.release.describe()
                )

    def must_log(self, rec: dict) -> bool:
        return self._released_now  # the decision's record

    def state_dict(self) -> dict[str, Any]:
        if self.release is not None:
            return {"release": self.release.state_dict()}
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.release is not None and "release" in state:
            self.release.load_state_dict(state["release"])
        elif self.release is None and "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
        elif self.release is None and "release" in state:  # the tracker of an adaptive run
            self.tracker.load_state_dict(state["release"]["tracker"])

    @classmethod
    def legacy_state(cls, extra: dict[str, Any]) -> dict[str, Any] | None:
        if "qk_release" in extra:
            return {"release": extra["qk_release"]}
        if "drift_tracker" in extra:
            return {"tracker": extra["drift_tracker"]}
        return None

    def summary(self) -> dict[str, Any]:
        return {"drift_seconds": self.meter.seconds}

    @classmethod
    def absent_summary(cls) -> dict[str, Any]:
        return {"drift_seconds": 0.0}
