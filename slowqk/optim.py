"""megatron-core DDP wrapping, optimizer, LR scheduler and the learning-rate groups, from a
recipe."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from slowqk import lr_groups
from slowqk.config import LRGroupConfig, ParallelConfig, Recipe, group_label, resolve_layers
from slowqk.qk.release import AdaptiveRelease, DriftTracker, fixed_release_record
from slowqk.qk.schedule import MultiplierSchedule, to_steps

log = logging.getLogger("slowqk.optim")


def wrap_ddp(
    model_chunks: list[torch.nn.Module],
    config: TransformerConfig,
    parallel: ParallelConfig,
    grad_reduce_in_fp32: bool = True,
) -> list[DistributedDataParallel]:
    """megatron-core's DDP around each chunk, with ``parallel``'s distributed optimizer, overlap
    and bucket settings. With overlap, the pipeline schedules start and finish each chunk's
    gradient reduce and parameter gather themselves, through the functions set on ``config`` (as
    Megatron-LM's trainer sets them)."""
    par = parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        bucket_size=par.bucket_size,
        use_distributed_optimizer=par.distributed_optimizer,
    )
    chunks = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(model_chunks)
    ]

    def one_or_list(funcs: list):
        return funcs[0] if len(funcs) == 1 else funcs

    if par.overlap_grad_reduce:
        config.no_sync_func = one_or_list([c.no_sync for c in chunks])
        config.grad_sync_func = one_or_list([c.start_grad_sync for c in chunks])
    if par.overlap_param_gather:
        config.param_sync_func = one_or_list([c.start_param_sync for c in chunks])
    return chunks


def finish_param_gather(chunks: list[DistributedDataParallel]) -> None:
    """With ``parallel.overlap_param_gather`` the updated parameters arrive with the next forward
    pass; what reads them before (a checkpoint, the diagnostics, a test) gathers them now."""
    for c in chunks:
        if c.ddp_config.overlap_param_gather:
            c.start_param_sync(force_sync=True)


def megatron_optimizer_config(recipe: Recipe) -> MegatronOptimizerConfig:
    o = recipe.optimizer
    bf16 = recipe.train.precision == "bf16"
    return MegatronOptimizerConfig(
        optimizer="sgd" if o.name == "sgd" else "adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        sgd_momentum=o.sgd_momentum,
        decoupled_weight_decay=o.name != "adam",
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=recipe.parallel.distributed_optimizer,
    )


def build_optimizer(recipe: Recipe, model_chunks: list[torch.nn.Module]):
    return get_megatron_optimizer(megatron_optimizer_config(recipe), model_chunks)


def build_scheduler(recipe: Recipe, optimizer) -> OptimizerParamScheduler:
    o, steps = recipe.optimizer, recipe.train.steps
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant", "linear": "linear"}[
        o.schedule
    ]
    warmup = min(o.warmup_steps, steps - 1) if steps > 1 else 0
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=steps,
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, int(o.wsd_decay_fraction * steps)) if style == "WSD" else None,
        lr_wsd_decay_style="linear" if style == "WSD" else None,
    )
    # The update made at step s uses the schedule at s + 1, so the first update is not lr=0
    # (warmup starts from init_lr=0) and the last one lands on min_lr.
    scheduler.step(1)
    return scheduler


def qk_schedules(recipe: Recipe) -> tuple[MultiplierSchedule, MultiplierSchedule]:
    qk = recipe.qk
    args = (qk.unit, recipe.train.steps, recipe.tokens_per_step)
    hold, ramp = to_steps(qk.hold, *args), to_steps(qk.ramp, *args)
    mult_q, mult_k = (qk.mult_q, qk.mult_k) if qk.enabled else (1.0, 1.0)
    return (
        MultiplierSchedule(mult_q, hold, ramp, qk.shape),
        MultiplierSchedule(mult_k, hold, ramp, qk.shape),
    )


def selected_layers(recipe: Recipe) -> list[int]:
    return resolve_layers(recipe.qk.layers, recipe.model.num_layers)


def lower_layers(recipe: Recipe) -> list[int]:
    """The layers below the slowed ones: whose settling the adaptive release waits for."""
    selected = selected_layers(recipe)
    return list(range(min(selected))) if selected else []


def drift_tracker(recipe: Recipe) -> DriftTracker:
    a = recipe.qk.adaptive
    return DriftTracker(threshold=a.threshold, smoothing=a.smoothing)


def build_release(recipe: Recipe) -> AdaptiveRelease | None:
    """The adaptive release decision (None for ``qk.release: fixed`` or with the intervention
    off)."""
    qk = recipe.qk
    if not qk.enabled or qk.release != "adaptive":
        return None
    args = (qk.unit, recipe.train.steps, recipe.tokens_per_step)
    return AdaptiveRelease(
        min_hold=to_steps(qk.adaptive.min_hold, *args),
        max_hold=to_steps(qk.adaptive.max_hold, *args),
        ramp_steps=to_steps(qk.ramp, *args),
        shape=qk.shape,
        tracker=drift_tracker(recipe),
    )


def release_record(recipe: Recipe, release: AdaptiveRelease | None) -> dict | None:
    """When and why the slowdown was released (None with the intervention off)."""
    if not recipe.qk.enabled:
        return None
    if release is not None:
        return release.record()
    sq, _ = qk_schedules(recipe)
    return fixed_release_record(sq.hold_steps, sq.ramp_steps)


QK_GROUPS = ("qk.q", "qk.k")  # the names of the qk: section's two groups


def group_schedule(recipe: Recipe, group: LRGroupConfig) -> MultiplierSchedule:
    """An ``lr_groups`` entry's multiplier over steps; constant for the whole run without
    ``hold``."""
    if group.hold is None:
        return MultiplierSchedule(group.mult, recipe.train.steps, 0, group.shape)
    args = (group.unit, recipe.train.steps, recipe.tokens_per_step)
    return MultiplierSchedule(
        group.mult, to_steps(group.hold, *args), to_steps(group.ramp, *args), group.shape
    )


def group_specs(
    recipe: Recipe, release: AdaptiveRelease | None = None
) -> list[lr_groups.GroupSpec]:
    """The ``qk:`` section (its Q and K groups, when enabled) and every ``lr_groups`` entry. With an
    adaptive ``release`` the Q/K multipliers follow its decision instead of the fixed hold."""
    n, specs = recipe.model.num_layers, []
    if recipe.qk.enabled:
        qk = recipe.qk
        if release is not None:
            schedules = release.schedule(qk.mult_q), release.schedule(qk.mult_k)
        else:
            schedules = qk_schedules(recipe)
            end = max(s.end_step for s in schedules)
            if end > recipe.train.steps:
                log.warning(
                    "qk: the slowdown ends at step %d, after this run's last (train.steps=%d): it "
                    "is never released in this run",
                    end,
                    recipe.train.steps,
                )
        layers = frozenset(selected_layers(recipe))
        for name, part, schedule in zip(QK_GROUPS, "qk", schedules, strict=True):
            specs.append(lr_groups.GroupSpec(name, frozenset(part), layers, schedule))
    for g in recipe.lr_groups:
        specs.append(
            lr_groups.GroupSpec(
                group_label(g, n),
                frozenset(g.params),
                frozenset(resolve_layers(g.layers, n)),
                group_schedule(recipe, g),
                quack_tau=g.mult if g.rule == "quack" else None,
            )
        )
    return specs


def build_lr_groups(
    recipe: Recipe, optimizer, model_chunks, release: AdaptiveRelease | None = None
) -> lr_groups.LRGroups | None:
    """Register the learning-rate groups (the Q/K intervention among them), or None if there are
    none."""
    specs = group_specs(recipe, release)
    return lr_groups.register(optimizer, model_chunks, specs) if specs else None


def step_multipliers(groups: lr_groups.LRGroups | None, step: int) -> dict:
    """The step record's multipliers: ``mult_q``/``mult_k`` (the ``qk:`` section, 1.0 when off)
    and ``lr_mult`` (each ``lr_groups`` entry by name, when there are any)."""
    mults = groups.set_step(step) if groups is not None else {}
    rec = {"mult_q": mults.pop(QK_GROUPS[0], 1.0), "mult_k": mults.pop(QK_GROUPS[1], 1.0)}
    if mults:
        rec["lr_mult"] = mults
    return rec


def head_multiplier_range(groups: lr_groups.LRGroups, device: torch.device) -> dict[str, float]:
    """Each head rule's smallest and largest multiplier of the last step over all heads and ranks
    (``<group>.q_min``, ``.q_max``, ``.k_min``, ``.k_max``)."""
    names = sorted(groups.rules)
    worst = []  # maxima of (max, -min) per group and kind, one all-reduce for all
    for name in names:
        for kind in "qk":
            values = [m for key, m in groups.head_mults[name].items() if key[0] == kind]
            worst += [max(values), -min(values)] if values else [-math.inf, -math.inf]
    t = torch.tensor(worst, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    out, it = {}, iter(t.tolist())
    for name in names:
        for kind in "qk":
            high, low = next(it), -next(it)
            if math.isfinite(high):
                out.update({f"{name}.{kind}_min": low, f"{name}.{kind}_max": high})
    return out


def lr_groups_record(recipe: Recipe) -> list[dict]:
    """Each ``lr_groups`` entry as run: name, parts, layers, multiplier and schedule in steps."""
    out = []
    n = recipe.model.num_layers
    for g in recipe.lr_groups:
        sched = group_schedule(recipe, g)
        out.append(
            {
                "name": group_label(g, n),
                "params": list(g.params),
                "layers": resolve_layers(g.layers, n),
                "mult": g.mult,
                "rule": g.rule,
                "hold_steps": sched.hold_steps if g.hold is not None else None,
                "ramp_steps": sched.ramp_steps,
                "shape": g.shape,
            }
        )
    return out
