"""In-training diagnostics (:mod:`slowqk.monitor`) every ``diagnostics.interval`` steps, and the
early warning of premature upper-layer specialization that reads them."""

from __future__ import annotations

import logging
from typing import Any

from slowqk.callbacks.base import Callback
from slowqk.callbacks.lower_drift import LowerDriftWatch, warning_enabled
from slowqk.data.loader import collate
from slowqk.early_warning import SpecializationWarning
from slowqk.metrics import truncate_after
from slowqk.monitor import Monitor
from slowqk.optim import lower_layers, selected_layers
from slowqk.qk.specialization import SpecializationSteps, probe_steps

log = logging.getLogger("slowqk.monitor")


class Diagnostics(Callback):
    """State: ``specialization_warning``. Records go to ``diagnostics.jsonl``."""

    name = "diagnostics"

    def __init__(
        self,
        monitor: Monitor,
        warning: SpecializationWarning | None,
        tracker,
        specialization: SpecializationSteps,
    ) -> None:
        self.monitor, self.warning, self.tracker = monitor, warning, tracker
        self.specialization = specialization

    @classmethod
    def build(cls, trainer) -> Diagnostics | None:
        r = trainer.recipe
        d = r.diagnostics
        if d.interval <= 0 and not d.steps:
            return None
        engine = trainer.engine
        n = r.diagnostics.probe_samples
        batch = {
            k: v.to(trainer.device) for k, v in collate(trainer.valid_ds, list(range(n))).items()
        }
        monitor = Monitor(
            r.diagnostics.interval,
            r.model.num_layers,
            engine,
            batch,
            trainer.device,
            trainer.run_dir / "diagnostics.jsonl",
            write=trainer.rank == 0,
            tensorboard=trainer.metrics.tensorboard,
            extra_steps=probe_steps(d.interval, d.log_spaced, d.steps),
        )
        specialization = SpecializationSteps(
            d.specialization_thresholds, selected_layers(r), lower_layers(r)
        )
        warning = tracker = None
        if warning_enabled(r):
            warning = SpecializationWarning(
                selected_layers(r), lower_layers(r), r.diagnostics.warn_entropy_gap
            )
            watch = trainer.callback(LowerDriftWatch)
            if watch is None:  # built before this one wherever the warning is on
                raise RuntimeError("the early warning needs the lower layers' drift watch")
            tracker = watch.tracker
        return cls(monitor, warning, tracker, specialization)

    def before_update(self, trainer, rec: dict) -> None:
        with self.monitor.timed():
            self.monitor.before_update(trainer.step)

    def after_update(self, trainer, rec: dict, updated: bool) -> None:
        with self.monitor.timed():
            record = self.monitor.after_update(trainer.step)
            if record is None:
                return
            self.specialization.update(
                record["step"], {int(k): v["entropy"] for k, v in record["layers"].items()}
            )
            if self.warning is not None:
                self._early_warning(trainer, record)
            self.monitor.write(record)

    def _early_warning(self, trainer, record: dict) -> None:
        """Every rank holds all layers' statistics here, so every rank keeps the same state."""
        event = self.warning.check(
            record["step"],
            {int(k): v["entropy"] for k, v in record["layers"].items()},
            lower_drifting=not self.tracker.settled,
        )
        if event is not None:
            record["warning"] = event
            if event["new_episode"] and trainer.rank == 0:
                log.warning(self.warning.message(event))

    def state_dict(self) -> dict[str, Any]:
        state = {"specialization_steps": self.specialization.state_dict()}
        if self.warning:
            state["specialization_warning"] = self.warning.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.warning is not None and "specialization_warning" in state:
            self.warning.load_state_dict(state["specialization_warning"])
        # a checkpoint from before these were kept: a crossing before it is not known
        self.specialization.load_state_dict(state.get("specialization_steps", {}))

    @classmethod
    def legacy_state(cls, extra: dict[str, Any]) -> dict[str, Any] | None:
        if "specialization_warning" in extra:
            return {"specialization_warning": extra["specialization_warning"]}
        return None

    def on_resume(self, trainer) -> None:
        if trainer.rank == 0:
            truncate_after(self.monitor.path, trainer.step)

    def summary(self) -> dict[str, Any]:
        return {
            "specialization_warning": self.warning.record() if self.warning else None,
            "specialization": self.specialization.record(self.monitor.num_layers),
            "diagnostics_seconds": self.monitor.seconds,
        }

    @classmethod
    def absent_summary(cls) -> dict[str, Any]:
        return {"specialization_warning": None, "specialization": None, "diagnostics_seconds": 0.0}
