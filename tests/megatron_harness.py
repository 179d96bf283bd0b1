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


def build_stack(recipe: Recipe, with_qk: bool = True, float64: bool = False, init_from=None):
    """init parallel state; build model, DDP, optimizer, scheduler, Q/K scaling.

    ``float64`` runs the whole megatron-core stack in float64 (verification only);
    ``init_from`` copies the weights of another model of the same recipe.
    """
    from slowqk.distributed import init_distributed
    from slowqk.models import build_gpt_model, build_transformer_config, wrap_precision
    from slowqk.optim import build_optimizer, build_qk_scaling, build_scheduler, wrap_ddp

    init_distributed(recipe.parallel, recipe.seed)
    cfg = build_transformer_config(
        recipe.model, tensor_parallel=recipe.parallel.tensor, pipeline_parallel=recipe.parallel.pipeline,
        precision=recipe.train.precision,
    )
    if float64:
        from slowqk.patches import cpu_compat

        cpu_compat.enable_float64_verification()
        cfg.params_dtype = torch.float64
    model = build_gpt_model(recipe.model, cfg, VOCAB)
    if torch.cuda.is_available():
        model = model.cuda()
    model = wrap_precision(model, cfg)
    if float64:
        model = model.to(torch.float64)  # torch norms ignore params_dtype
    if init_from is not None:
        model.load_state_dict(init_from.state_dict())
    chunks = wrap_ddp([model], cfg, recipe.parallel.distributed_optimizer, grad_reduce_in_fp32=not float64)
    opt = build_optimizer(recipe, chunks)
    sched = build_scheduler(recipe, opt)
    qk = build_qk_scaling(recipe, opt, chunks) if with_qk else None
    return model, chunks, opt, sched, qk


def gather_full_state(model: torch.nn.Module, gated_ffn: bool) -> dict[str, torch.Tensor]:
    """TP-merged copy of a megatron-core GPTModel's parameters, in megatron naming."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        t = p.detach().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            if gated_ffn and "mlp.linear_fc1" in name:  # each rank holds [gate_r; up_r]
                gates, ups = zip(*(x.chunk(2, dim=0) for x in parts), strict=True)
                parts = [*gates, *ups]
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t
    return out


def train_step(chunks, opt, sched, qk, step: int, ids: torch.Tensor) -> tuple[float, float]:
    """One megatron-core step on ``ids`` (labels = next tokens of a random stream)."""
    for c in chunks:
        c.zero_grad_buffer()
    opt.zero_grad()
    if qk is not None:
        qk.set_step(step)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(inputs.shape[1]).expand_as(inputs)
    # Loss from TP-gathered logits in the model's own dtype: megatron's vocab-parallel cross
    # entropy works in fp32 even for float64 models, which would defeat float64 verification.
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = next(chunks[0].parameters()).device
    inputs, labels = inputs.to(device), labels.to(device)
    pos = pos.to(device)
    logits = gather_from_tensor_model_parallel_region(chunks[0](inputs, pos, None))
    if logits.dtype in (torch.bfloat16, torch.float16):  # keep float64 runs in float64
        logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    for c in chunks:
        c.finish_grad_sync()
    _, grad_norm, _ = opt.step()
    sched.step(1)
    return loss.item(), float(grad_norm or 0.0)
