"""The memory report as text: one row per pipeline stage, and whether the largest fits."""

from __future__ import annotations

from slowqk.config import Recipe
from slowqk.memory.predict import CUDA, Device, StageMemory, memory_report

GIB = 2**30
# What the prediction leaves out (the CUDA context, NCCL's buffers, temporaries such as the
# logits and gathered weights, the allocator's fragmentation) needs room of its own.
HEADROOM = 0.10


def knobs(recipe: Recipe) -> list[str]:
    """The scale knobs a recipe turns on, in words."""
    par, rc = recipe.parallel, recipe.train.recompute
    parts = []
    if par.virtual_pipeline:
        parts.append(f"{par.virtual_pipeline} virtual stages per pipeline rank")
    if par.sequence_parallel:
        parts.append("sequence parallel")
    if par.overlap_grad_reduce:
        parts.append("overlapped reduce" + (" and gather" if par.overlap_param_gather else ""))
    if rc.granularity == "selective":
        parts.append(f"selective recomputation ({', '.join(rc.modules)})")
    elif rc.granularity == "full":
        parts.append(f"full recomputation ({rc.full_method}, {rc.full_num_layers} layer(s))")
    parts.append("distributed optimizer" if par.distributed_optimizer else "replicated optimizer")
    return parts


def describe_layout(recipe: Recipe, gpus: int) -> str:
    par, tr = recipe.parallel, recipe.train
    dp = gpus // (par.tensor * par.pipeline)
    parts = [f"TP {par.tensor} x PP {par.pipeline} x DP {dp}", *knobs(recipe)]
    micro = tr.global_batch_size // (tr.micro_batch_size * dp)
    return (
        f"{recipe.name} on {gpus} GPUs: {'; '.join(parts)}\n"
        f"micro-batch {tr.micro_batch_size} x {recipe.model.seq_length} tokens, {micro} per "
        f"step and data-parallel rank; {tr.precision}"
    )


def layout_notes(recipe: Recipe, recipe_name: str, gpus: int) -> list[str]:
    """What a dry run shows beside the layout: the knobs and the predicted memory per GPU."""
    notes = [f"knobs: {', '.join(knobs(recipe))}"]
    if recipe.parallel.engine == "megatron":
        largest = _largest(memory_report(recipe, gpus, recipe.declared_vocab_size))
        notes.append(
            f"memory per GPU, predicted: {largest.total / GIB:.1f} GiB on pipeline stage "
            f"{largest.stage} (slowqk print-recipe {recipe_name} --memory --gpus {gpus})"
        )
    return notes


def format_report(
    recipe: Recipe, gpus: int, vocab: int, device_gb: float = 80.0, device: Device = CUDA
) -> str:
    stages = memory_report(recipe, gpus, vocab, device)
    lines = [f"# {line}" for line in describe_layout(recipe, gpus).splitlines()]
    lines.append(f"# predicted bytes per GPU ({device.name}), GiB; vocabulary {vocab}")
    head = ("stage", "parameters", "gradients", "optimizer", "activations", "total")
    lines.append("".join(f"{h:>12}" for h in head))
    for st in stages:
        cells = (st.parameters, st.gradients, st.optimizer, st.activations, st.total)
        lines.append(f"{st.stage:>12}" + "".join(f"{c / GIB:>12.2f}" for c in cells))
    lines += _notes(stages, device_gb)
    return "\n".join(lines) + "\n"


def _largest(stages: list[StageMemory]) -> StageMemory:
    return max(stages, key=lambda st: st.total)


def _notes(stages: list[StageMemory], device_gb: float) -> list[str]:
    first = stages[0]
    largest = _largest(stages)
    capacity = device_gb * 1e9
    left = capacity - largest.total
    fits = largest.total <= capacity * (1 - HEADROOM)
    verdict = "fits" if fits else "does not fit"
    return [
        f"# activations: {first.activations_per_layer / 2**20:.1f} MiB per layer and "
        f"micro-batch, stage 0 holding {first.layers} layer-micro-batches at its peak "
        f"({first.in_flight} in flight)",
        f"# largest: stage {largest.stage}, {largest.total / GIB:.2f} GiB of {device_gb:g} GB "
        f"({capacity / GIB:.1f} GiB): {verdict} with {HEADROOM:.0%} kept for what is not "
        f"counted (CUDA context, communication buffers, temporaries, fragmentation); "
        f"{left / GIB:.1f} GiB left",
    ]
