"""The engine interface the one training loop drives: what differs between megatron-core and
DeepSpeed.

An engine owns the wrapped model, the optimizer and LR scheduler, the forward/backward over one
global batch, the optimizer step, the checkpoint format and the checks of its own checkpoints. The
loop (:mod:`slowqk.train`) and its callbacks see only this interface; ``chunks`` (the unwrapped
model chunks this rank holds) and ``optimizer`` (what the learning-rate groups and the drift meter
hook) are the same kinds of objects under both engines. Losses stay on the device: the loop reads
them when it logs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from slowqk.config import Recipe
from slowqk.engines.common import masked_mean_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Engine(ABC):
    name: str
    chunks: list[torch.nn.Module]  # the model chunks this rank holds (megatron-core modules)
    optimizer: Any  # megatron-core's optimizer, or DeepSpeed's ZeRO optimizer
    scheduler: Any  # megatron-core's OptimizerParamScheduler, stepping ``optimizer``
    config: Any  # megatron-core's TransformerConfig of the model

    def __init__(
        self,
        recipe: Recipe,
        layout,
        device: torch.device,
        vocab_size: int,
        init_weights: Path | None = None,
    ) -> None:
        """``init_weights``: a checkpoint whose weights (only) the model starts from."""
        self.recipe, self.layout, self.device = recipe, layout, device
        # the objective on one micro-batch: (loss mask, per-token losses) -> scalar loss
        self.loss_fn: LossFn = masked_mean_loss
        self._build(vocab_size, init_weights)

    @abstractmethod
    def _build(self, vocab_size: int, init_weights: Path | None) -> None:
        """The model, its wrappers, the optimizer and the scheduler."""

    @classmethod
    @abstractmethod
    def check_checkpoint(cls, path: Path, saved: dict, recipe: Recipe, data_parallel: int) -> None:
        """Refuse (``ValueError``, one line) a checkpoint of this engine that this run's layout
        cannot load; ``saved`` is its run information. Called before any data work."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Before a step's forward/backward: no gradient left from the previous one."""

    @abstractmethod
    def forward_backward(self, dataset, step: int, forward_only: bool) -> torch.Tensor:
        """One global batch (the ``step``-th of ``dataset``); its mean loss as a float64 scalar on
        the device, equal on every rank. Reads nothing back to the host per micro-batch."""

    @abstractmethod
    def optimizer_step(self, loss: torch.Tensor) -> tuple[bool, float | None]:
        """Apply the update unless the loss or a gradient is non-finite anywhere (then params,
        optimizer state and the LR schedule stay as they were); ``(updated, grad_norm)``."""

    @abstractmethod
    def probe_forward(self, batch: dict) -> None:
        """Forward-only pass of one micro-batch (the diagnostics probe's hooks read it)."""

    @abstractmethod
    def layer_grad_sq(self, layer_of_param: dict[int, int], num_layers: int) -> torch.Tensor:
        """Squared norm per layer of the reduced gradient the optimizer sees (before clipping),
        over the data-parallel ranks; the caller reduces over tensor and pipeline ranks."""

    @abstractmethod
    def full_weights(self, params: list[torch.nn.Parameter]) -> AbstractContextManager:
        """While inside, ``params`` hold their whole values on this rank (ZeRO-3 gathers)."""

    @abstractmethod
    def train_mode(self, training: bool) -> None: ...

    @abstractmethod
    def save(self, ckpt_root: Path, step: int, extra: dict, files: dict[str, Path]) -> Path: ...

    @abstractmethod
    def load(self, path: Path) -> dict:
        """Model, optimizer, scheduler and RNG states; returns the checkpoint's run information."""
