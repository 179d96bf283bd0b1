"""train.fused_kernels: megatron-core's own fused kernels (no Transformer Engine) keep the math.

The same run with and without them (SwiGLU with biases, so every fused kernel is on the path:
bias-SwiGLU, bias-dropout-add, the vocab-parallel cross-entropy) gives the same losses to fp32
rounding; the megatron-core modules really take the fused branches.
"""

from __future__ import annotations

from conftest import two_layer_overrides
from multiproc import run_ranks

MODEL = {
    "model.ffn": "swiglu",
    "model.bias": "true",
    "model.norm": "rmsnorm",
    "model.position": "rope",
}


def _worker(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.distributed import shutdown
    from slowqk.train import Trainer

    recipe = load_recipe("tiny/gpt", overrides)
    trainer = Trainer(recipe, quiet=True)
    c = trainer.config
    flags = (c.bias_activation_fusion, c.bias_dropout_fusion, c.cross_entropy_loss_fusion)
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    trainer.metrics.close()
    shutdown()
    return {"flags": flags, "losses": losses}


def test_fused_kernels_give_the_same_losses(small_dataset, tmp_path) -> None:
    def run(fused: bool) -> dict:
        extra = {**MODEL, "train.fused_kernels": fused}
        overrides = two_layer_overrides(small_dataset, tmp_path / f"fused-{fused}", 3, **extra)
        return run_ranks(_worker, 1, overrides)[0]

    plain, fused = run(False), run(True)
    assert plain["flags"] == (False, False, False) and fused["flags"] == (True, True, True)
    assert plain["losses"][0] == fused["losses"][0]  # the first forward: the same numbers
    assert max(abs(a - b) for a, b in zip(plain["losses"], fused["losses"], strict=True)) < 1e-4
