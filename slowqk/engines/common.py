"""What both engines share: the training objective on one micro-batch and the micro-batches of a
global batch for this data-parallel rank."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from slowqk.config import Recipe
from slowqk.data.loader import micro_batches


def masked_mean_loss(loss_mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Mean per-token loss over the tokens the mask keeps (one micro-batch), in fp32."""
    mask = loss_mask.view(-1).float()
    return torch.sum(output.float().view(-1) * mask) / mask.sum()


def device_batches(
    recipe: Recipe, dataset, step: int, dp_rank: int, dp_size: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """The ``step``-th global batch's micro-batches for this data-parallel rank, on ``device``."""
    t = recipe.train
    for batch in micro_batches(
        dataset, step, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size
    ):
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def mean_on_device(losses: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The mean of micro-batch losses as a float64 scalar on ``device``, summed in order (the
    same bits as summing their values on the host), without reading any of them."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for loss in losses:
        total = total + loss.detach().double()
    return total / len(losses)
