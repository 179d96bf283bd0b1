"""train.compile: the megatron-core model under torch.compile trains like eager.

One rank and two data-parallel ranks with the distributed optimizer, 20 steps each way: the
losses agree to 1e-4 (fp32; inductor reorders the reductions, so not bitwise), and the model
really runs compiled, as one graph. With evaluation and the attention probe on, the run compiles
no more than its training and its evaluation graphs (the probe runs eagerly) and measures what the
eager run measures. What it does not compose with is refused when the recipe loads.
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
    compiled = unwrap_model(trainer.engine.chunks[0])._compiled_call_impl is not None
    trainer.metrics.close()
    shutdown()
    return {"losses": losses, "compiled": compiled, "graphs": _graphs()}


def _graphs() -> dict[str, int]:
    """The graphs dynamo captured in this process, and the graph breaks it met."""
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        # dynamo files some breaks (data-dependent branches, skipped frames) as "unimplemented"
        "breaks": sum(counters["graph_break"].values()) + sum(counters["unimplemented"].values()),
    }


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_compiled_model_trains_like_eager(small_dataset, tmp_path, world: int) -> None:
    def run(compiled: bool) -> dict:
        out = tmp_path / f"compiled-{compiled}"
        overrides = two_layer_overrides(small_dataset, out, STEPS, **{"train.compile": compiled})
        return run_ranks(_train, world, overrides)[0]

    eager, compiled = run(False), run(True)
    assert not eager["compiled"] and compiled["compiled"]
    assert compiled["graphs"] == {"graphs": 1, "breaks": 0}, compiled["graphs"]
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


def _run(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    train(load_recipe("tiny/gpt", overrides), quiet=True)
    return _graphs()


@pytest.mark.slow
def test_compiled_run_evaluates_and_probes_like_eager(small_dataset, tmp_path) -> None:
    from slowqk.metrics import read_metrics
    from slowqk.monitor import read_diagnostics

    extra = {"train.eval_interval": 5, "train.eval_iters": 1, "diagnostics.interval": 5}
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled-{compiled}"
        overrides = two_layer_overrides(
            small_dataset, out, 10, **extra, **{"train.compile": compiled}
        )
        graphs = run_ranks(_run, 1, overrides)[0]
        runs[compiled] = (
            graphs,
            read_metrics(out / "metrics.jsonl"),
            read_diagnostics(out / "diagnostics.jsonl"),
        )
    (_, m_eager, d_eager), (graphs, m_comp, d_comp) = runs[False], runs[True]
    # training and evaluation; the probe and its hooks run eagerly and cost no recompilation
    assert graphs == {"graphs": 2, "breaks": 0}, graphs
    val = [(r["step"], r["val_loss"]) for r in m_eager if "val_loss" in r]
    val_c = [(r["step"], r["val_loss"]) for r in m_comp if "val_loss" in r]
    assert [s for s, _ in val] == [s for s, _ in val_c] == [5, 10]
    assert max(abs(a - b) for (_, a), (_, b) in zip(val, val_c, strict=True)) < 1e-4
    assert [r["step"] for r in d_eager] == [r["step"] for r in d_comp] and d_eager
    for a, b in zip(d_eager, d_comp, strict=True):
        for layer, v in a["layers"].items():
            assert abs(v["entropy"] - b["layers"][layer]["entropy"]) < 1e-4
            assert abs(v["attn_write_rms"] - b["layers"][layer]["attn_write_rms"]) < 1e-3
