"""train.compile: megatron-core's transformer layers under torch.compile train like eager.

One rank and two data-parallel ranks with the distributed optimizer, 20 steps each way: the
losses agree to 1e-4 (fp32; inductor reorders the reductions, so not bitwise), and the layers
really run compiled. What it does not compose with is refused when the recipe loads.
"""

from __future__ import annotations

import pytest
from conftest import two_layer_overrides
from multiproc import run_ranks

STEPS = 20


def _train(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.distributed import shutdown
    from slowqk.models import unwrap_model
    from slowqk.train import Trainer

    recipe = load_recipe("tiny/gpt", overrides)
    trainer = Trainer(recipe, quiet=True)
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    layers = unwrap_model(trainer.engine.chunks[0]).decoder.layers
    is_compiled = [layer._compiled_call_impl is not None for layer in layers]
    trainer.metrics.close()
    shutdown()
    return {"losses": losses, "compiled": is_compiled}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_compiled_layers_train_like_eager(small_dataset, tmp_path, world: int) -> None:
    def run(compiled: bool) -> dict:
        out = tmp_path / f"compiled-{compiled}"
        overrides = two_layer_overrides(small_dataset, out, STEPS, **{"train.compile": compiled})
        return run_ranks(_train, world, overrides)[0]

    eager, compiled = run(False), run(True)
    assert eager["compiled"] == [False, False] and compiled["compiled"] == [True, True]
    gaps = [abs(a - b) for a, b in zip(eager["losses"], compiled["losses"], strict=True)]
    assert max(gaps) < 1e-4, gaps
    # it trained: the comparison means something
    assert eager["losses"][-1] < eager["losses"][0] - 0.5


@pytest.mark.parametrize(
    "overrides",
    [["parallel.tensor=2"], ["parallel.pipeline=2"], ["parallel.engine=deepspeed"]],
)
def test_compile_is_refused_where_it_is_not_verified(overrides) -> None:
    from slowqk.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="key 'train.compile': measured with the megatron engine"):
        load_recipe("tiny/gpt", ["train.compile=true", *overrides])
