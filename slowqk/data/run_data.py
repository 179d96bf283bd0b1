"""A run's data, the same for every engine: resolve the recipe's sources, load the tokenizer, build
the train/validation datasets (rank 0 first, so the index caches are built once)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from slowqk.config import Recipe
from slowqk.data.loader import build_datasets
from slowqk.data.shard import blend, check_tokenizer, load_manifest
from slowqk.data.stage import prepared_dataset, stage_dir
from slowqk.data.tokenizer import load_tokenizer
from slowqk.data.verify import check_dataset_on_open
from slowqk.models import padded_vocab_size


@dataclass
class RunData:
    tokenizer: Any
    vocab_size: int  # padded for the recipe's tensor-parallel size
    train: Any
    valid: Any


def resolve_sources(recipe: Recipe) -> tuple[Path, list[str], list[str], list[float] | None]:
    """Tokenizer, train prefixes, validation prefixes and train blend weights (a corpus as the
    data stage prepared it)."""
    d = recipe.data
    if d.train_prefixes:
        if d.tokenizer is None:
            raise ValueError("data.tokenizer is required with data.train_prefixes")
        return (
            Path(d.tokenizer),
            list(d.train_prefixes),
            list(d.valid_prefixes) or list(d.train_prefixes),
            d.train_weights,
        )
    if d.corpus is not None:  # prepared by the data stage before training started
        roots = [prepared_dataset(d, stage_dir(recipe))]
    else:
        roots = [Path(x) for x in (d.dataset if isinstance(d.dataset, list) else [d.dataset])]
    manifests = [load_manifest(r) for r in roots]
    tok_path = Path(d.tokenizer) if d.tokenizer else roots[0] / manifests[0]["tokenizer"]["file"]
    for root, manifest in zip(roots, manifests, strict=True):
        check_tokenizer(tok_path, root, manifest)
        check_dataset_on_open(root, manifest, hashes=d.verify)
    train, weights = blend(roots, d.train_weights, "train")
    has_valid = all("valid" in m["splits"] for m in manifests)
    valid = blend(roots, None, "valid")[0] if has_valid else train
    return tok_path, train, valid, weights


def check_out_dir(run_dir: Path) -> None:
    """Refuse an output directory that cannot be created, without creating anything."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"out_dir={run_dir}: cannot be created, {existing} is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"out_dir={run_dir}: cannot be created or written, {existing} is not writable"
        )


def build_run_data(recipe: Recipe, rank: int, run_dir: Path) -> RunData:
    check_out_dir(run_dir)
    t = recipe.train
    tok_path, train_prefixes, valid_prefixes, train_weights = resolve_sources(recipe)
    tokenizer = load_tokenizer(tok_path)
    vocab = recipe.model.vocab_size or tokenizer.vocab_size
    padded = padded_vocab_size(
        vocab, recipe.model.make_vocab_size_divisible_by, recipe.parallel.tensor
    )
    cache = run_dir / "data" / "cache"
    if rank == 0:
        cache.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    def build():
        return build_datasets(
            tokenizer,
            seq_length=recipe.model.seq_length,
            seed=recipe.seed,
            train_prefixes=train_prefixes,
            valid_prefixes=valid_prefixes,
            train_weights=train_weights,
            train_samples=t.steps * t.global_batch_size,
            valid_samples=t.eval_iters * t.global_batch_size,
            cache_dir=cache,
        )

    if rank == 0:  # builds the index caches once
        train, valid = build()
    dist.barrier()
    if rank != 0:
        train, valid = build()
    return RunData(tokenizer, padded, train, valid)
