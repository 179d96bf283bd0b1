"""Helpers for tests that drive real megatron-core models inside spawned gloo ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from slowqk.config import Recipe, build_recipe

VOCAB = 256


def tiny_recipe(**overrides) -> Recipe:
    """A tiny recipe; ``overrides`` are nested dicts merged into the defaults."""
    data = {
        "name": "test",
        "data": {"corpus": "unused.txt"},
        "model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0, "clip_grad": 1.0},
        "train": {"steps": 8, "micro_batch_size": 2, "global_batch_size": 2},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return build_recipe(data)


def build_stack(recipe: Recipe, with_groups: bool = True, float64: bool = False, init_from=None):
    """init parallel state; build model, DDP, optimizer, scheduler, learning-rate groups.

    ``float64`` runs the whole megatron-core stack in float64 (verification only);
    ``init_from`` copies the weights of another model of the same recipe. With
    ``parallel.virtual_pipeline`` the model is the list of this rank's chunks, built as the
    engine builds them (each chunk's weights drawn as at PP=1).
    """
    from megatron.core.distributed import finalize_model_grads

    from slowqk.distributed import init_distributed
    from slowqk.models import build_model_chunks, build_transformer_config, wrap_precision
    from slowqk.optim import build_lr_groups, build_optimizer, build_scheduler, wrap_ddp

    init_distributed(recipe.parallel, recipe.seed)
    vpp = recipe.parallel.virtual_pipeline
    cfg = build_transformer_config(
        recipe.model,
        tensor_parallel=recipe.parallel.tensor,
        pipeline_parallel=recipe.parallel.pipeline,
        virtual_pipeline=vpp,
        precision=recipe.train.precision,
        sequence_parallel=recipe.parallel.sequence_parallel,
    )
    if float64:
        from slowqk.patches import cpu_compat

        cpu_compat.enable_float64_verification()
        cfg.params_dtype = cfg.pipeline_dtype = torch.float64
    if vpp:
        cfg.batch_p2p_comm = False  # as the engine does on gloo
    models = []
    for chunk in build_model_chunks(recipe.model, cfg, VOCAB):
        if torch.cuda.is_available():
            chunk = chunk.cuda()
        chunk = wrap_precision(chunk, cfg)
        if float64:
            chunk = chunk.to(torch.float64)  # torch norms ignore params_dtype
        models.append(chunk)
    if init_from is not None:
        for chunk, other in zip(models, init_from if vpp else [init_from], strict=True):
            chunk.load_state_dict(other.state_dict())
    chunks = wrap_ddp(models, cfg, recipe.parallel, grad_reduce_in_fp32=not float64)
    opt = build_optimizer(recipe, chunks)
    cfg.finalize_model_grads_func = finalize_model_grads  # the pipeline schedule's grad sync
    cfg.grad_scale_func = opt.scale_loss
    sched = build_scheduler(recipe, opt)
    groups = build_lr_groups(recipe, opt, chunks) if with_groups else None
    return (models if vpp else models[0]), chunks, opt, sched, groups


def gather_full_state(model, gated_ffn: bool) -> dict[str, torch.Tensor]:
    """TP-merged copy of a megatron-core GPTModel's parameters (or of a list of virtual-stage
    chunks), in megatron naming with global layer numbers (merged over pipeline stages too; a
    tied last stage's copy of the embedding is ``output_layer.weight``)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for chunk in model if isinstance(model, list) else [model]:
        layers = _unwrap(chunk).decoder.layers
        offset = layers[0].layer_number - 1 if len(layers) else 0
        for name, p in _unwrap(chunk).named_parameters():
            t = p.detach().clone()
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=group)
                if gated_ffn and "mlp.linear_fc1" in name:  # each rank holds [gate_r; up_r]
                    gates, ups = zip(*(x.chunk(2, dim=0) for x in parts), strict=True)
                    parts = [*gates, *ups]
                t = torch.cat(parts, dim=p.partition_dim)
            if name.startswith("decoder.layers."):
                layer, rest = name.removeprefix("decoder.layers.").split(".", 1)
                name = f"decoder.layers.{int(layer) + offset}.{rest}"
            out[name] = t
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(
            stages, out, group=parallel_state.get_pipeline_model_parallel_group()
        )
        out = {k: v for stage in stages for k, v in stage.items()}
    return out


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a Float16Module (names as the plain model's)."""
    from slowqk.models import unwrap_model

    return unwrap_model(module)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Loss from TP-gathered logits in the model's own dtype: megatron's vocab-parallel cross
    # entropy works in fp32 even for float64 models, which would defeat float64 verification.
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    logits = gather_from_tensor_model_parallel_region(logits)
    if logits.dtype in (torch.bfloat16, torch.float16):  # keep float64 runs in float64
        logits = logits.float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    )


def train_step(chunks, opt, sched, groups, step: int, ids: torch.Tensor) -> tuple[float, float]:
    """One megatron-core step on ``ids`` (labels = next tokens of a random stream); under pipeline
    parallelism through megatron-core's schedule (one micro-batch; with virtual stages one per
    pipeline stage)."""
    from megatron.core import parallel_state

    for c in chunks:
        c.zero_grad_buffer()
    opt.zero_grad()
    if groups is not None:
        groups.set_step(step)
    device = next(chunks[0].parameters()).device
    inputs, labels = ids[:, :-1].to(device), ids[:, 1:].to(device)
    pos = torch.arange(inputs.shape[1], device=device).expand_as(inputs)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # virtual stages: the interleaved schedule wants as many micro-batches as stages (the
        # mean of equal micro-batches' means is the batch's mean)
        n = parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
        micro = list(zip(inputs.chunk(n), pos.chunk(n), labels.chunk(n), strict=True))

        def forward_step(iterator, model):
            x, p, y = next(iterator)

            def loss_func(out):
                loss = _loss(out, y)
                return loss, {"lm loss": loss.detach()}

            return model(x, p, None), loss_func

        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=chunks,
            num_microbatches=n,
            seq_length=inputs.shape[1],
            micro_batch_size=inputs.shape[0] // n,
            forward_only=False,
        )
        losses = [sum(x["lm loss"] for x in losses) / n] if losses else []
        loss = losses[0] if losses else torch.zeros(())
    else:
        loss = _loss(chunks[0](inputs, pos, None), labels)
        loss.backward()
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(chunks)  # as the schedule does: DP sync, then TP sums (QK-norm grads)
    _, grad_norm, _ = opt.step()
    sched.step(1)
    return loss.item(), float(grad_norm or 0.0)
