"""The callback interface (see :mod:`slowqk.callbacks` for when each hook runs)."""

from __future__ import annotations

from typing import Any


class Callback:
    @classmethod
    def build(cls, trainer) -> Callback | None:
        return cls()

    def on_step_start(self, trainer, rec: dict) -> None: ...

    def before_update(self, trainer, rec: dict) -> None: ...

    def after_update(self, trainer, rec: dict, updated: bool) -> None: ...

    def on_step_end(self, trainer, rec: dict) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, extra: dict[str, Any]) -> None: ...

    def on_resume(self, trainer) -> None: ...

    def summary(self) -> dict[str, Any]:
        return {}
