"""What the training loop does besides training, as callbacks: each concern is one file and one
entry in :func:`callback_classes`.

The loop calls every callback's hooks in list order, at these points of each step:

1. ``on_step_start(trainer, rec)``: before the step's forward/backward (``trainer.step`` updates
   done so far). ``rec`` is the step's record; what a hook adds to it is logged.
2. ``before_update(trainer, rec)``: gradients reduced, before the optimizer step.
3. ``after_update(trainer, rec, updated)``: after the optimizer step (``updated`` False when the
   step was skipped); ``trainer.step`` now counts it.
4. ``on_step_end(trainer, rec)``: after the step's evaluation, logging and checkpoint.

Checkpoints keep each callback's ``state_dict()`` under its ``name`` (``callbacks.<name>`` of the
run information); on resume ``load_state_dict(state)`` gets it back (from ``legacy_state(extra)``
for a checkpoint of older code) and ``on_resume(trainer)`` follows. ``summary()`` adds the
callback's keys to ``summary.json`` (``absent_summary()`` where the recipe does not use it);
``must_log(rec)`` logs a step's record whatever the interval.

A callback's ``build(trainer)`` returns it, or None where the recipe does not ask for it; it may
look up the callbacks built before it with ``trainer.callback(cls)``. The decision objects the
callbacks drive (:class:`~slowqk.qk.release.AdaptiveRelease`, ``DriftTracker``,
:class:`~slowqk.early_warning.SpecializationWarning`) know nothing of the loop or the engine.
"""

from __future__ import annotations

from slowqk.callbacks.base import Callback
from slowqk.callbacks.diagnostics import Diagnostics
from slowqk.callbacks.faults import FaultInjection
from slowqk.callbacks.lower_drift import LowerDriftWatch
from slowqk.callbacks.qk_scaling import QKScaling

__all__ = ["Callback", "Diagnostics", "FaultInjection", "LowerDriftWatch", "QKScaling"]


def callback_classes() -> list[type[Callback]]:
    """The callbacks every run considers, in hook order (later ones may read earlier ones)."""
    return [QKScaling, LowerDriftWatch, Diagnostics, FaultInjection]
