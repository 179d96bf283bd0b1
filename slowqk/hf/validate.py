"""Validation loss of a checkpoint from SlowQK's own loop and from its Hugging Face export, on the
same validation batches, so users can see the conversion changed nothing."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from slowqk.checkpoint import load_model_weights, read_extra, resolve_checkpoint
from slowqk.config import Recipe
from slowqk.data.loader import micro_batches
from slowqk.train import Trainer


def hf_loss_on_batches(hf_dir: str | Path, batches: list[list[dict]]) -> float:
    """Mean over global batches of the mean over micro-batches of the masked token loss: the
    reduction the training loop's ``evaluate`` uses."""
    # deferred: transformers is an optional extra, imported only where used
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar would sit among our lines
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    per_batch = []
    with torch.no_grad():
        for micro in batches:
            losses = []
            for mb in micro:
                logits = model(
                    input_ids=mb["tokens"], position_ids=mb["position_ids"]
                ).logits.float()
                ce = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), mb["labels"], reduction="none"
                )
                mask = mb["loss_mask"].float()
                losses.append(float((ce * mask).sum() / mask.sum()))
            per_batch.append(sum(losses) / len(losses))
    return sum(per_batch) / len(per_batch)


def compare_validation(
    checkpoint: str | Path, hf_dir: str | Path, run_dir: str | Path | None = None
) -> dict:
    """``{"slowqk": loss, "hf": loss, ...}`` on the checkpoint recipe's validation batches.

    Builds the run's data and model on one process (any saved TP/PP layout is resharded to 1x1).
    ``run_dir`` is where the run's prepared data lives (default: the checkpoint's run directory).
    """
    path = resolve_checkpoint(checkpoint)
    data = read_extra(path)["recipe"]
    data["parallel"].update(tensor=1, pipeline=1)
    data["diagnostics"]["interval"] = 0
    data["train"].update(tensorboard=False, progress_bar=False, init_from=None)
    data["out_dir"] = str(run_dir or path.parent.parent)
    trainer = Trainer(Recipe.model_validate(data), quiet=True)
    try:
        load_model_weights(path, [c.module for c in trainer.chunks])
        ours = trainer.evaluate()
        t = trainer.recipe.train
        batches = [
            list(micro_batches(trainer.valid_ds, i, t.global_batch_size, t.micro_batch_size, 0, 1))
            for i in range(t.eval_iters)
        ]
    finally:
        trainer.metrics.close()
    theirs = hf_loss_on_batches(hf_dir, batches)
    return {
        "slowqk": ours,
        "hf": theirs,
        "abs_diff": abs(ours - theirs),
        "slowqk_ppl": math.exp(ours),
        "hf_ppl": math.exp(theirs),
        "tokens": t.eval_iters * t.global_batch_size * trainer.recipe.model.seq_length,
    }
