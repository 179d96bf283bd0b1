"""The scale knobs checked against the layout, the engine, the model and each other
(sequence parallelism, overlapped communication, virtual stages, recomputation); each problem
names both keys. Part of :func:`slowqk.config.checks.recipe_problems`."""

from __future__ import annotations

from slowqk.config.schema import Recipe

_SCALE_KNOBS = ("sequence_parallel", "overlap_grad_reduce", "overlap_param_gather")


def scale_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """The scale knobs against the layout, the engine and each other; each problem names both
    keys."""
    par, rc, t, out = recipe.parallel, recipe.train.recompute, recipe.train, []
    if par.sequence_parallel and par.tensor == 1:
        out.append(
            (
                "parallel.sequence_parallel",
                "needs parallel.tensor > 1 (got 1): it splits the sequence over the "
                "tensor-parallel ranks",
            )
        )
    if par.sequence_parallel and recipe.model.seq_length % par.tensor:
        out.append(
            (
                "parallel.sequence_parallel",
                f"needs model.seq_length ({recipe.model.seq_length}) divisible by "
                f"parallel.tensor ({par.tensor}): each tensor rank holds an equal slice",
            )
        )
    out += _context_parallel_problems(recipe)
    vpp = par.virtual_pipeline
    if vpp is not None and par.pipeline == 1:
        out.append(
            (
                "parallel.virtual_pipeline",
                "needs parallel.pipeline > 1 (got 1): virtual stages interleave pipeline ranks",
            )
        )
    elif vpp is not None and recipe.model.num_layers % (par.pipeline * vpp):
        out.append(
            (
                "parallel.virtual_pipeline",
                f"got {vpp}; parallel.pipeline ({par.pipeline}) x it must divide "
                f"model.num_layers ({recipe.model.num_layers})",
            )
        )
    if vpp is not None and recipe.model.tie_embeddings:
        out.append(
            (
                "parallel.virtual_pipeline",
                "needs model.tie_embeddings=false: with virtual stages megatron-core 0.16's "
                "checkpoint keeps another tensor as the optimizer's copy of the tied embedding "
                "(measured: a resume loads wrong embeddings)",
            )
        )
    if par.overlap_param_gather and not par.distributed_optimizer:
        out.append(
            (
                "parallel.overlap_param_gather",
                "needs parallel.distributed_optimizer=true: only the distributed optimizer "
                "all-gathers parameters",
            )
        )
    if par.overlap_param_gather and not par.overlap_grad_reduce:
        out.append(
            (
                "parallel.overlap_param_gather",
                "needs parallel.overlap_grad_reduce=true (megatron-core overlaps the gather only "
                "together with the reduce-scatter)",
            )
        )
    if par.engine == "deepspeed":
        on = [f"parallel.{k}" for k in _SCALE_KNOBS if getattr(par, k)]
        on += ["parallel.bucket_size"] if par.bucket_size is not None else []
        on += ["parallel.virtual_pipeline"] if vpp is not None else []
        on += ["train.recompute"] if rc.granularity != "none" else []
        if on:
            out.append(
                (
                    "parallel.engine",
                    f"deepspeed does not take {', '.join(on)}: these are megatron-core's; ZeRO "
                    "has its own overlap and bucket settings",
                )
            )
    out.extend(_recompute_problems(recipe))
    if t.compile and (rc.granularity != "none" or par.overlap_grad_reduce):
        knob = "train.recompute" if rc.granularity != "none" else "parallel.overlap_grad_reduce"
        out.append(
            (
                "train.compile",
                f"not with {knob}: megatron-core's recomputation and its gradient hooks run "
                "inside the backward pass that torch.compile traces, and the pair is not "
                "verified",
            )
        )
    return out


def _recompute_problems(recipe: Recipe) -> list[tuple[str, str]]:
    rc, m, pp = recipe.train.recompute, recipe.model, recipe.parallel.pipeline
    out: list[tuple[str, str]] = []
    if rc.granularity == "selective":
        for key in ("method", "num_layers"):
            if getattr(rc, key) is not None:
                out.append(
                    (
                        f"train.recompute.{key}",
                        "is for train.recompute.granularity=full; selective recomputes "
                        "train.recompute.modules of every layer",
                    )
                )
        if not rc.modules:
            out.append(("train.recompute.modules", "selective recomputation needs a module"))
        if "layernorm" in rc.modules and recipe.model.attention_backend != "te":
            out.append(
                (
                    "train.recompute.modules",
                    "layernorm needs model.attention_backend=te (got "
                    f"{recipe.model.attention_backend}): megatron-core recomputes the norms "
                    "through Transformer Engine's fused norm layers only",
                )
            )
        if "mlp" in rc.modules and recipe.model.bias:
            out.append(
                (
                    "train.recompute.modules",
                    "mlp needs model.bias=false: megatron-core's checkpoint of the MLP hands back "
                    "the fc2 bias parameter itself, and its backward then recurses until memory "
                    "runs out (seen with megatron-core 0.16.1)",
                )
            )
    elif rc.modules != ["core_attn"]:  # not its default: a dumped recipe repeats the default
        out.append(
            (
                "train.recompute.modules",
                f"is for train.recompute.granularity=selective (got {rc.granularity})",
            )
        )
    if rc.granularity == "none":
        for key in ("method", "num_layers"):
            if getattr(rc, key) is not None:
                out.append(
                    (f"train.recompute.{key}", "needs train.recompute.granularity=full (got none)")
                )
    stages = pp * (recipe.parallel.virtual_pipeline or 1)  # layers per model chunk
    per_stage = m.num_layers // stages if m.num_layers % stages == 0 else None
    if rc.granularity == "full" and per_stage and rc.full_num_layers > per_stage:
        out.append(
            (
                "train.recompute.num_layers",
                f"got {rc.num_layers}; at most the layers of a pipeline stage "
                f"(model.num_layers / parallel.pipeline = {per_stage})",
            )
        )
    uniform = rc.granularity == "full" and rc.full_method == "uniform"
    if uniform and per_stage and per_stage % rc.full_num_layers:
        out.append(
            (
                "train.recompute.num_layers",
                f"got {rc.num_layers}; with train.recompute.method=uniform it must divide "
                f"the layers of a pipeline stage ({per_stage})",
            )
        )
    return out


def _context_parallel_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """megatron-core splits attention over context-parallel ranks (ring attention) only inside
    Transformer Engine's attention; its local attention, and SDPA, need the whole sequence."""
    cp, backend = recipe.parallel.context_parallel, recipe.model.attention_backend
    if cp == 1:
        return []
    if backend in ("sdpa", "local"):
        return [
            (
                "parallel.context_parallel",
                f"needs model.attention_backend=te (got {backend}): megatron-core splits "
                "attention over context ranks only inside Transformer Engine's attention; "
                f"{backend} attends over the whole sequence on each rank",
            )
        ]
    return [
        (
            "parallel.context_parallel",
            f"got {cp} with model.attention_backend={backend}: Transformer Engine's ring "
            "attention needs two or more GPUs, and no run here has tested slowqk's sequence "
            "split and loss reduction on them, so it is refused rather than trusted",
        )
    ]
