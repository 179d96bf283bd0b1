"""DeepSpeed as the data-parallel engine for the same megatron-core models (ZeRO stages 1, 2, 3).

The model, data, learning-rate schedule, Q/K intervention and learning-rate groups are SlowQK's;
DeepSpeed replaces megatron-core's DDP and optimizer. Supported: TP = PP = 1 (megatron-core's
tensor/pipeline parallelism needs its own DDP and schedules); fp32, or bf16 where DeepSpeed
supports it. The learning-rate groups hook the torch optimizer inside DeepSpeed's ZeRO optimizer
and know which elements of each flat fp32 partition they cover (see
``patches/lr_groups.iter_main_params``).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.distributed as dist

from slowqk.config import Recipe


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """megatron-core's default grouping: no weight decay on biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    # wd_mult: megatron-core's scheduler sets weight_decay = schedule x wd_mult on every group
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


def deepspeed_config(recipe: Recipe, data_parallel: int, stage: int) -> dict:
    t, o = recipe.train, recipe.optimizer
    cfg = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * data_parallel),
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1 << 30,
    }
    if o.clip_grad:
        cfg["gradient_clipping"] = o.clip_grad
    if t.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def train_deepspeed(recipe: Recipe, stage: int, quiet: bool = True) -> dict:
    """Train ``recipe`` with DeepSpeed ZeRO ``stage``; returns the summary (also written to the
    run)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    from slowqk.data.loader import micro_batches
    from slowqk.data.run_data import build_run_data
    from slowqk.distributed import init_distributed
    from slowqk.lower_drift import LowerLayerDrift
    from slowqk.metrics import MetricsWriter
    from slowqk.models import build_gpt_model, build_transformer_config
    from slowqk.optim import (
        build_lr_groups,
        build_release,
        build_scheduler,
        lower_layers,
        lr_groups_record,
        release_record,
        step_multipliers,
    )
    from slowqk.train import masked_mean_loss

    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
    # layout, unsupported features and the optimizer were checked when the recipe was loaded
    layout = init_distributed(recipe.parallel, recipe.seed, timeout_s=recipe.train.dist_timeout)
    t = recipe.train
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    run_dir = recipe.run_dir
    data = build_run_data(recipe, layout.rank, run_dir)
    train_ds, valid_ds, vocab = data.train, data.valid, data.vocab_size

    config = build_transformer_config(recipe.model, precision=t.precision)
    model = build_gpt_model(recipe.model, config, vocab).to(device)
    o = recipe.optimizer
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(recipe, layout.data, stage)
    )
    scheduler = build_scheduler(recipe, ds_optimizer)
    release = build_release(recipe)
    groups = build_lr_groups(recipe, ds_optimizer, [model], release)
    drift_meter = (
        LowerLayerDrift(ds_optimizer, [model], lower_layers(recipe))
        if release is not None
        else None
    )

    def mean_loss(batch) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = engine(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return masked_mean_loss(batch["loss_mask"], out)

    def across_dp(value: float) -> float:
        v = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(v)
        return v.item() / layout.data

    def evaluate() -> float:
        engine.eval()
        with torch.no_grad():
            per_iter = []
            for i in range(t.eval_iters):
                losses = [
                    mean_loss(b).item()
                    for b in micro_batches(
                        valid_ds,
                        i,
                        t.global_batch_size,
                        t.micro_batch_size,
                        dist.get_rank(),
                        layout.data,
                    )
                ]
                per_iter.append(across_dp(sum(losses) / len(losses)))
        engine.train()
        return sum(per_iter) / len(per_iter)

    metrics = MetricsWriter(run_dir, t.tensorboard, enabled=layout.rank == 0)
    if layout.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    for step in range(t.steps):
        mults = step_multipliers(groups, step)
        lr = ds_optimizer.param_groups[0]["lr"]
        measuring = release is not None and not release.decided
        if measuring:
            drift_meter.arm()
        losses = []
        for batch in micro_batches(
            train_ds, step, t.global_batch_size, t.micro_batch_size, dist.get_rank(), layout.data
        ):
            loss = mean_loss(batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            losses.append(loss.item())
        scheduler.step(1)
        rec = {"loss": across_dp(sum(losses) / len(losses)), "lr": lr, **mults}
        if measuring:
            rec["lower_drift"] = drift_meter.collect(lr)
            if release.observe(step + 1, rec["lower_drift"]):
                rec["qk_release"] = release.record()
            rec["lower_drift_ratio"] = release.tracker.ratio
        if (step + 1) % t.eval_interval == 0 or step + 1 == t.steps:
            rec["val_loss"] = evaluate()
        if (
            (step + 1) % t.log_interval == 0
            or "val_loss" in rec
            or step + 1 == t.steps
            or "qk_release" in rec
        ):
            metrics.log(step + 1, rec)
    final = evaluate()
    metrics.close()
    summary = {
        "name": recipe.name,
        "engine": f"deepspeed-zero{stage}",
        "steps": t.steps,
        "final_val_loss": final,
        "final_val_ppl": math.exp(min(final, 50.0)),
        "qk_enabled": recipe.qk.enabled,
        "qk_release": release_record(recipe, release),
        "lr_groups": lr_groups_record(recipe),
    }
    if layout.rank == 0:
        from slowqk.provenance import provenance

        summary["provenance"] = provenance()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
