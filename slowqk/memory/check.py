"""The prediction against what a rank really holds: run under ``torchrun`` (or any launcher
that sets ``RANK`` / ``WORLD_SIZE``) as ``python -m slowqk.memory.check RECIPE [key=value ...]``;
rank 0 prints one JSON line with both.

Builds the recipe's model, wrappers and optimizer as training does (the megatron engine), takes
one optimizer step on zero gradients so that Adam's state exists, then runs one training forward
of a random micro-batch counting the bytes saved for backward: per transformer layer (the
decoder's bytes without its final norm, over its layers; full recomputation saves a group's
input outside any one layer) and elsewhere. Activations are measured with one pipeline stage.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from slowqk.config import Recipe, load_recipe
from slowqk.distributed import init_distributed
from slowqk.engines import build_engine
from slowqk.memory.measure import allocated_state_bytes, count_saved_for_backward
from slowqk.memory.predict import (
    CPU,
    CUDA,
    input_edge_bytes,
    layer_activation_bytes,
    output_edge_bytes,
    state_bytes,
)
from slowqk.models import unwrap_model


def measure(recipe: Recipe, vocab_size: int) -> dict:
    """This rank's allocated and saved bytes, and the prediction for its stage."""
    layout = init_distributed(recipe.parallel, recipe.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    engine = build_engine(recipe, layout, device, vocab_size)
    engine.zero_grad()
    engine.optimizer.step()  # zero gradients: creates Adam's state, changes nothing
    stage = parallel_state.get_pipeline_model_parallel_rank()
    out = {
        "stage": stage,
        "measured": allocated_state_bytes(engine.chunks, engine.optimizer),
        "predicted": state_bytes(recipe, stage, vocab_size, data_parallel=layout.data),
    }
    if recipe.parallel.pipeline == 1:
        model = unwrap_model(engine.chunks[0])
        decoder = model.decoder
        regions = {"decoder": decoder}
        if decoder.final_layernorm is not None:
            regions["final_norm"] = decoder.final_layernorm
        s, b = recipe.model.seq_length, recipe.train.micro_batch_size
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (b, s), generator=gen).to(device)
        pos = torch.arange(s, device=device).expand(b, s)
        engine.train_mode(True)
        weights = [p for c in engine.chunks for p in c.parameters()]  # views of any buffer
        loss, saved = count_saved_for_backward(
            lambda: engine.chunks[0](ids, pos, None, labels=ids), weights, regions
        )
        loss.float().sum().backward()
        if cuda:  # what the allocator saw at its peak, everything included
            out["measured"]["peak_allocated"] = torch.cuda.max_memory_allocated()
        layers = len(decoder.layers)
        out["measured"]["activations_per_layer"] = saved.get("decoder") // layers
        out["measured"]["activations_outside_layers"] = saved.total - saved.get("decoder")
        cpu = CUDA if cuda else CPU
        out["predicted"]["activations_per_layer"] = layer_activation_bytes(recipe, cpu)
        out["predicted"]["activations_outside_layers"] = input_edge_bytes(
            recipe, cpu
        ) + output_edge_bytes(recipe, vocab_size, cpu)
    return out


def main(argv: list[str]) -> int:
    recipe = load_recipe(argv[0], argv[1:])
    result = measure(recipe, recipe.declared_vocab_size)
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        print(json.dumps(results))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
