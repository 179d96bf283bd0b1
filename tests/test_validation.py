"""The validation schedule: every train.eval_interval steps, the last step, step 0 on request."""

from __future__ import annotations

from slowqk.config import load_recipe
from slowqk.validation import Validator


def _schedule(*overrides: str) -> list[int]:
    recipe = load_recipe("tiny/gpt", ["train.steps=10", "train.eval_interval=4", *overrides])
    validator = Validator(recipe, engine=None, dataset=None)
    return [s for s in range(0, 11) if validator.should_evaluate(s)]


def test_validation_runs_on_its_interval_and_at_the_last_step() -> None:
    assert _schedule() == [4, 8, 10]


def test_validation_at_step_0_only_on_request() -> None:
    assert _schedule("train.eval_at_start=true") == [0, 4, 8, 10]
    assert _schedule("train.eval_at_start=true", "train.eval_interval=5") == [0, 5, 10]
