"""The callback interface (see :mod:`slowqk.callbacks` for when each hook runs)."""

from __future__ import annotations

from typing import Any, ClassVar


class Callback:
    """A concern of the loop besides training; ``name`` keys its state in checkpoints."""

    name: ClassVar[str]

    @classmethod
    def build(cls, trainer) -> Callback | None:
        return cls()

    def on_step_start(self, trainer, rec: dict) -> None: ...

    def before_update(self, trainer, rec: dict) -> None: ...

    def after_update(self, trainer, rec: dict, updated: bool) -> None: ...

    def on_step_end(self, trainer, rec: dict) -> None: ...

    def must_log(self, rec: dict) -> bool:
        """Whether this step's record is logged whatever the log interval (an event in it)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback, under its ``name`` ({} for nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @classmethod
    def legacy_state(cls, extra: dict[str, Any]) -> dict[str, Any] | None:
        """This callback's state from a checkpoint written before callback state had its own
        names (commit d36f473 and older: top-level keys of the run information), or None."""
        return None

    def on_resume(self, trainer) -> None: ...

    def summary(self) -> dict[str, Any]:
        """The keys this callback adds to ``summary.json``."""
        return {}

    @classmethod
    def absent_summary(cls) -> dict[str, Any]:
        """Its summary keys where the recipe does not use it (every summary has the same keys)."""
        return {}
