"""The engines the one training loop drives: what differs between megatron-core and DeepSpeed.

An engine owns the wrapped model, the optimizer and LR scheduler, the forward/backward over one
global batch, the optimizer step and the checkpoint format. The loop (:mod:`slowqk.train`) and its
callbacks see only this interface; ``chunks`` (the unwrapped model chunks this rank holds) and
``optimizer`` (what the learning-rate groups and the drift meter hook) are the same kinds of objects
under both engines.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from slowqk.config import Recipe
from slowqk.engines.deepspeed import DeepSpeedEngine
from slowqk.engines.megatron import MegatronEngine


class Engine(Protocol):
    name: str
    chunks: list[torch.nn.Module]  # the model chunks this rank holds (megatron-core modules)
    optimizer: Any  # megatron-core's optimizer, or DeepSpeed's ZeRO optimizer
    scheduler: Any  # megatron-core's OptimizerParamScheduler, stepping ``optimizer``
    config: Any  # megatron-core's TransformerConfig of the model
    poison_loss: bool  # fault injection: this step's loss (and gradients) become NaN

    def zero_grad(self) -> None:
        """Before a step's forward/backward: no gradient left from the previous one."""

    def forward_backward(self, dataset, step: int, forward_only: bool) -> float:
        """One global batch (the ``step``-th of ``dataset``); its mean loss, equal on every
        rank."""

    def optimizer_step(self, loss: float) -> tuple[bool, float | None]:
        """Apply the update unless the loss or a gradient is non-finite anywhere (then params,
        optimizer state and the LR schedule stay as they were); ``(updated, grad_norm)``."""

    def probe_forward(self, batch: dict) -> None:
        """Forward-only pass of one micro-batch (the diagnostics probe's hooks read it)."""

    def layer_grad_sq(self, layer_of_param: dict[int, int], num_layers: int) -> torch.Tensor:
        """Squared norm per layer of the reduced gradient the optimizer sees (before clipping),
        over the data-parallel ranks; the caller reduces over tensor and pipeline ranks."""

    def full_weights(self, params: list[torch.nn.Parameter]) -> AbstractContextManager:
        """While inside, ``params`` hold their whole values on this rank (ZeRO-3 gathers)."""

    def train_mode(self, training: bool) -> None: ...

    def save(self, ckpt_root: Path, step: int, extra: dict, files: dict[str, Path]) -> Path: ...

    def load(self, path: Path) -> dict:
        """Model, optimizer, scheduler and RNG states; returns the checkpoint's run information."""


def build_engine(recipe: Recipe, layout, device: torch.device, vocab_size: int, **kw) -> Engine:
    """The engine ``parallel.engine`` names, built for this rank (``kw``: see the engines)."""
    if recipe.parallel.engine == "deepspeed":
        return DeepSpeedEngine(recipe, layout, device, vocab_size, **kw)
    return MegatronEngine(recipe, layout, device, vocab_size, **kw)
