"""What every engine holds; each builds its model, optimizer and scheduler in ``_build``."""

from __future__ import annotations

from pathlib import Path

import torch

from slowqk.config import Recipe


class EngineBase:
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
        self.poison_loss = False  # fault injection: this step's loss (and gradients) become NaN
        self._build(vocab_size, init_weights)

    def _build(self, vocab_size: int, init_weights: Path | None) -> None:
        raise NotImplementedError
