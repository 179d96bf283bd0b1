"""The engines the one training loop drives behind one interface (:class:`Engine`, in
:mod:`slowqk.engines.base`): megatron-core (:mod:`~slowqk.engines.megatron`) and DeepSpeed ZeRO
(:mod:`~slowqk.engines.deepspeed`); what they share is in :mod:`~slowqk.engines.common`."""

from __future__ import annotations

import torch

from slowqk.config import Recipe
from slowqk.engines.base import Engine
from slowqk.engines.deepspeed import DeepSpeedEngine
from slowqk.engines.megatron import MegatronEngine

__all__ = ["DeepSpeedEngine", "Engine", "MegatronEngine", "build_engine", "engine_class"]


def engine_class(name: str) -> type[Engine]:
    """The engine ``parallel.engine`` names."""
    return DeepSpeedEngine if name == "deepspeed" else MegatronEngine


def build_engine(recipe: Recipe, layout, device: torch.device, vocab_size: int, **kw) -> Engine:
    """The engine ``parallel.engine`` names, built for this rank (``kw``: see :class:`Engine`)."""
    return engine_class(recipe.parallel.engine)(recipe, layout, device, vocab_size, **kw)
