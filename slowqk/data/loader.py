"""megatron-core ``GPTDataset``s and a resume-safe global-batch sampler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from slowqk.data.tokenizer import SentencePieceTokenizer


def _check_prefix(prefix: str) -> None:
    missing = [f"{prefix}{e}" for e in (".bin", ".idx") if not Path(f"{prefix}{e}").is_file()]
    if missing:
        raise FileNotFoundError(f"indexed dataset files missing: {', '.join(missing)}")


def build_datasets(
    tokenizer: SentencePieceTokenizer,
    *,
    seq_length: int,
    seed: int,
    train_prefixes: list[str],
    valid_prefixes: list[str],
    train_weights: list[float] | None,
    train_samples: int,
    valid_samples: int,
    cache_dir: str | Path,
) -> tuple[GPTDataset, GPTDataset]:
    for p in [*train_prefixes, *valid_prefixes]:
        _check_prefix(p)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[(train_prefixes, train_weights), (valid_prefixes, None), None],
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache_dir),
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid


def global_batch_indices(
    step: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    """Sample indices of each micro-batch this DP rank processes at ``step``.

    A pure function of the step, so a resumed run reads exactly what an uninterrupted one would.
    """
    base = step * global_batch
    per_micro = micro_batch * dp_size
    return [
        [base + m * per_micro + dp_rank * micro_batch + i for i in range(micro_batch)]
        for m in range(global_batch // per_micro)
    ]


def collate(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    items = [dataset[i % len(dataset)] for i in indices]
    return {
        k: torch.stack([torch.as_tensor(it[k]) for it in items])
        for k in ("tokens", "labels", "loss_mask", "position_ids")
    }


def micro_batches(
    dataset, step: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> Iterator[dict]:
    for idx in global_batch_indices(step, global_batch, micro_batch, dp_rank, dp_size):
        yield collate(dataset, idx)
