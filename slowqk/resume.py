"""What a run may start from: its own newest checkpoint (resume) or another run's weights
(``train.init_from``); each refused in one line, before any data work where it can be, when it
does not fit this run."""

from __future__ import annotations

from pathlib import Path

from slowqk.checkpoint import (
    checkpoint_engine,
    latest_checkpoint,
    megatron_checkpoint,
    read_extra,
)
from slowqk.config import (
    ModelConfig,
    Recipe,
    RecipeChangedError,
    architecture,
    run_altering_changes,
)
from slowqk.engines import engine_class


def resumable_checkpoint(
    ckpt_root: Path, recipe: Recipe, data_parallel: int, allow_recipe_change: bool
) -> tuple[Path, dict, list[str]] | None:
    """The checkpoint a resume would load, its run information and the recipe changes; refused
    here when the recipe changed in ways that alter the run, or the engine cannot load it."""
    path = latest_checkpoint(ckpt_root)
    if path is None:
        return None
    saved = read_extra(path)
    wrote, runs = checkpoint_engine(path), recipe.parallel.engine
    if wrote != runs:
        raise RecipeChangedError(
            f"{path}: written by the {wrote} engine, this run uses parallel.engine={runs}; "
            f"resume with parallel.engine={wrote} (train.init_from reads megatron checkpoints)"
        )
    engine_class(runs).check_checkpoint(path, saved, recipe, data_parallel)
    changes = run_altering_changes(saved["recipe"], recipe.model_dump(mode="json"))
    if changes and not allow_recipe_change:
        raise RecipeChangedError(
            f"{path}: the recipe differs from the checkpoint's in fields that alter the run: "
            + "; ".join(changes)
            + " (pass --allow-recipe-change if intended)"
        )
    return path, saved, changes


def check_resume_fits(path: Path, saved: dict, tokenizer_sha256: str, vocab_size: int, recipe):
    """The tokenizer and padded vocabulary of a checkpoint about to be resumed."""
    if saved.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(f"{path}: tokenizer sha256 differs from the recipe's tokenizer")
    saved_vocab = saved.get("padded_vocab_size", vocab_size)
    if saved_vocab != vocab_size:
        raise ValueError(
            f"{path}: the checkpoint's padded vocabulary has {saved_vocab} rows, this layout "
            f"pads to {vocab_size} (model.make_vocab_size_divisible_by="
            f"{recipe.model.make_vocab_size_divisible_by}, "
            f"parallel.tensor={recipe.parallel.tensor}); resume with a tensor-parallel "
            f"size that divides {saved_vocab} and make_vocab_size_divisible_by"
        )


def init_source(recipe: Recipe, tokenizer_sha256: str, vocab_size: int) -> Path:
    """The checkpoint ``train.init_from`` names, checked against this run: tokenizer, vocabulary
    rows and architecture."""
    source = recipe.train.init_from
    path = megatron_checkpoint(source, "train.init_from")
    saved = read_extra(path)
    if saved.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(
            f"train.init_from={source}: the checkpoint's tokenizer differs from this run's "
            "(use its tokenizer: data.tokenizer=<checkpoint>/tokenizer/...)"
        )
    if saved.get("padded_vocab_size", vocab_size) != vocab_size:
        raise ValueError(
            f"train.init_from={source}: {saved['padded_vocab_size']} embedding rows, this run "
            f"has {vocab_size}"
        )
    mine = architecture(recipe.model)
    theirs = architecture(ModelConfig.model_validate(saved["recipe"]["model"]))
    diff = [
        f"model.{k}: {theirs[k]!r} (checkpoint) vs {v!r}" for k, v in mine.items() if theirs[k] != v
    ]
    if diff:
        raise ValueError(f"train.init_from={source}: architecture differs: " + "; ".join(diff))
    return path
