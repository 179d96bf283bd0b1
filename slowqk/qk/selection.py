"""Which layers a selection names (pure logic): the top ``k``, the top fraction, or a list."""

from __future__ import annotations

import math
from collections.abc import Sequence


def select_layers(
    num_layers: int,
    *,
    top: int | None = None,
    top_fraction: float | None = None,
    indices: Sequence[int] | None = None,
) -> list[int]:
    """0-based global indices of the selected layers. ``top_fraction=0.5`` is layers >= L/2."""
    given = [x is not None for x in (top, top_fraction, indices)]
    if sum(given) != 1:
        raise ValueError("give exactly one of top, top_fraction, indices")
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"layer indices {bad} out of range for {num_layers} layers (0..{num_layers - 1})"
            )
        return sorted(set(indices))
    if top_fraction is not None:
        top = max(1, math.floor(top_fraction * num_layers + 1e-9))
    assert top is not None
    if not 1 <= top <= num_layers:
        raise ValueError(f"top={top} must be between 1 and the number of layers ({num_layers})")
    return list(range(num_layers - top, num_layers))
