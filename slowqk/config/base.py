"""What every recipe section shares: strict validation, and the error a recipe problem raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RecipeError(ValueError):
    """A recipe or override is invalid; the message is meant for the user as is."""


class StrictSection(BaseModel):
    """A recipe section: unknown keys are errors, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
