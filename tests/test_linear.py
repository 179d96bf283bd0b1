"""slowqk.linear: the direct path of the parallel linears is megatron-core's math to the bit.

One training run with every direct linear switched back to megatron-core's path and one with
them as built: the same losses and the same parameters afterwards, bit for bit. At two tensor
ranks the layers keep megatron-core's path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import two_layer_overrides
from multiproc import run_ranks

LLAMA = {
    "model.ffn": "swiglu",
    "model.norm": "rmsnorm",
    "model.position": "rope",
    "model.bias": "false",
}


def _direct_layers(trainer) -> list:
    from slowqk.linear import DirectColumnParallelLinear, DirectRowParallelLinear

    return [
        m
        for c in trainer.engine.chunks
        for m in c.modules()
        if isinstance(m, DirectColumnParallelLinear | DirectRowParallelLinear)
    ]


def _train(rank: int, world: int, overrides: list[str], direct: bool) -> dict:
    from slowqk.config import load_recipe
    from slowqk.distributed import shutdown
    from slowqk.train import Trainer

    trainer = Trainer(load_recipe("tiny/gpt", overrides), quiet=True)
    layers = _direct_layers(trainer)
    built = [m.direct for m in layers]
    for m in layers:
        m.direct = direct
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    params = {n: p.detach().clone() for c in trainer.engine.chunks for n, p in c.named_parameters()}
    trainer.metrics.close()
    shutdown()
    return {"built": built, "losses": losses, "params": params}


@pytest.mark.parametrize("model", [{}, LLAMA], ids=["gpt", "llama"])
def test_direct_linears_train_to_the_same_bits(small_dataset, tmp_path, model: dict) -> None:
    def run(direct: bool) -> dict:
        overrides = two_layer_overrides(small_dataset, tmp_path / f"direct-{direct}", 3, **model)
        return run_ranks(_train, 1, overrides, direct)[0]

    stock, direct = run(False), run(True)
    # qkv, proj, fc1, fc2 in each of the 2 layers, all on the direct path at one tensor rank
    assert direct["built"] == [True] * 8
    assert direct["losses"] == stock["losses"]
    assert direct["losses"][-1] < direct["losses"][0]  # it trained
    assert direct["params"].keys() == stock["params"].keys()
    for name, p in stock["params"].items():
        assert torch.equal(p, direct["params"][name]), name


def _built_direct(rank: int, world: int, overrides: list[str]) -> list[bool]:
    from slowqk.config import load_recipe
    from slowqk.distributed import shutdown
    from slowqk.train import Trainer

    trainer = Trainer(load_recipe("tiny/gpt", overrides), quiet=True)
    built = [m.direct for m in _direct_layers(trainer)]
    trainer.metrics.close()
    shutdown()
    return built


def test_two_tensor_ranks_keep_megatron_cores_path(small_dataset, tmp_path) -> None:
    overrides = two_layer_overrides(small_dataset, tmp_path, 1, **{"parallel.tensor": 2})
    assert run_ranks(_built_direct, 2, overrides) == [[False] * 8] * 2
