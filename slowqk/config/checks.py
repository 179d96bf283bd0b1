"""What a recipe needs more than one field to check: layers against the model, lengths against
the run, shapes against the parallel layout, groups against each other. ``(key, problem)`` pairs;
:func:`slowqk.config.loading.build_recipe` turns them into one error."""

from __future__ import annotations

from pydantic import BaseModel

from slowqk.config.groups import group_coverage, group_label, resolve_layers
from slowqk.config.layout_checks import scale_problems
from slowqk.config.schema import Recipe
from slowqk.qk.parts import atoms
from slowqk.qk.schedule import to_steps


def recipe_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """What needs more than one field to check (layers against the model, lengths against the run,
    shapes against the parallel layout), so that loading a recipe (print-recipe, train, submit)
    refuses everything the run would, before any data work. ``(key, what is wrong)`` pairs."""
    m, par, qk, t = recipe.model, recipe.parallel, recipe.qk, recipe.train
    out: list[tuple[str, str]] = []
    try:
        resolve_layers(qk.layers, m.num_layers)
    except ValueError as exc:
        out.append(("qk.layers", str(exc)))
    # adaptive: hold is unused
    lengths = _lengths_in_steps(
        recipe, qk, ("hold", "ramp") if qk.release == "fixed" else ("ramp",), "qk", out
    )
    if (
        qk.release == "fixed"
        and qk.unit == "fraction"
        and len(lengths) == 2
        and qk.hold + qk.ramp > 1
    ):
        out.append(
            (
                "qk.hold",
                f"hold + ramp = {qk.hold} + {qk.ramp} of train.steps: more than the whole run, "
                "the slowdown would never end",
            )
        )
    if qk.release == "adaptive":
        out.extend(_adaptive_problems(recipe))
    out.extend(_lr_group_problems(recipe))
    tp, pp, groups = par.tensor, par.pipeline, m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % tp:
        out.append(
            (
                "parallel.tensor",
                f"got {tp}; it must divide model.num_attention_heads ({m.num_attention_heads})",
            )
        )
    if m.ffn_size % tp:
        out.append(("parallel.tensor", f"got {tp}; it must divide the FFN width ({m.ffn_size})"))
    if groups % tp and tp % groups:  # fewer groups than ranks is fine: megatron replicates K/V
        out.append(
            (
                "parallel.tensor",
                f"got {tp}; it and the query groups ({groups}) must divide one another",
            )
        )
    if m.num_layers % pp:
        out.append(
            ("parallel.pipeline", f"got {pp}; it must divide model.num_layers ({m.num_layers})")
        )
    if t.global_batch_size % t.micro_batch_size:
        out.append(
            (
                "train.global_batch_size",
                f"got {t.global_batch_size}; it must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size})",
            )
        )
    if t.compile and (tp != 1 or pp != 1 or par.engine != "megatron"):
        out.append(
            (
                "train.compile",
                f"measured with the megatron engine at parallel.tensor=1, parallel.pipeline=1 "
                f"only (got {par.engine}, {tp} x {pp}): the tensor-parallel collectives inside "
                "the layers, the pipeline schedule and DeepSpeed's engine are not verified under "
                "torch.compile",
            )
        )
    if par.engine == "deepspeed":
        if tp != 1 or pp != 1:
            out.append(
                (
                    "parallel.engine",
                    f"deepspeed runs at parallel.tensor=1, parallel.pipeline=1 (got {tp} x {pp}); "
                    "use the megatron engine for TP/PP",
                )
            )
        if recipe.optimizer.name != "adamw":
            out.append(
                (
                    "optimizer.name",
                    f"got {recipe.optimizer.name!r}; the DeepSpeed engine is wired for adamw",
                )
            )
    out.extend(scale_problems(recipe))
    return out


def _lengths_in_steps(
    recipe: Recipe,
    section: BaseModel,
    keys: tuple[str, ...],
    prefix: str,
    problems: list[tuple[str, str]],
    unit_key: str = "qk.unit",
) -> dict[str, int]:
    """Each length ``section.<key>`` (in the unit at ``unit_key``) in steps; what is wrong goes to
    ``problems``."""
    unit = recipe.qk.unit if unit_key == "qk.unit" else section.unit
    out = {}
    for key in keys:
        value = getattr(section, key)
        if unit == "fraction" and value > 1:
            problems.append(
                (
                    f"{prefix}.{key}",
                    f"got {value}; with {unit_key}=fraction it is a fraction of "
                    "train.steps, at most 1",
                )
            )
            continue
        try:
            out[key] = to_steps(value, unit, recipe.train.steps, recipe.tokens_per_step)
        except ValueError as exc:
            problems.append((f"{prefix}.{key}", f"got {value}; {exc} ({unit_key}={unit})"))
    return out


def _quack_problems(recipe: Recipe, g, key: str) -> list[tuple[str, str]]:
    """QuacK sets the Q and K rates of each head from the other's norm: both parts, every step."""
    out = []
    if sorted(g.params) != ["k", "q"]:
        out.append((f"{key}.params", f"got {g.params}; rule=quack needs params [q, k]"))
    if g.hold is not None or g.ramp:
        out.append(
            (f"{key}.hold", "rule=quack has no hold or ramp: its multipliers follow the weights")
        )
    if recipe.parallel.engine == "deepspeed" and recipe.parallel.zero_stage == 3:
        out.append(
            (
                f"{key}.rule",
                "rule=quack reads whole heads of the QKV weights, which ZeRO-3 partitions; "
                "use parallel.zero_stage 1 or 2, or the megatron engine",
            )
        )
    return out


def _lr_group_problems(recipe: Recipe) -> list[tuple[str, str]]:
    m, out = recipe.model, []
    labels: dict[str, str] = {}
    for i, g in enumerate(recipe.lr_groups):
        key = f"lr_groups.{i}"
        if g.layers is not None:
            try:
                resolve_layers(g.layers, m.num_layers)
            except ValueError as exc:
                out.append((f"{key}.layers", str(exc)))
                continue
        for part in g.params:
            if part in ("gate", "up") and m.ffn != "swiglu":
                out.append(
                    (
                        f"{key}.params",
                        f"got {part!r}; model.ffn={m.ffn} has no gated FFN (gate/up need "
                        "ffn=swiglu; fc1 is the whole first FFN layer)",
                    )
                )
            if part == "output" and m.tie_embeddings:
                out.append(
                    (
                        f"{key}.params",
                        "got 'output'; with model.tie_embeddings=true the output layer is "
                        "the embedding (name 'embedding', or set tie_embeddings=false)",
                    )
                )
        pieces = [atoms(p, m.ffn == "swiglu") for p in g.params]
        if sum(map(len, pieces)) != len(set().union(*pieces)):
            out.append(
                (
                    f"{key}.params",
                    f"got {g.params}; each element once (fc1 of a gated FFN is gate and up)",
                )
            )
        if g.rule == "quack":
            out.extend(_quack_problems(recipe, g, key))
        elif g.hold is not None:
            lengths = _lengths_in_steps(
                recipe, g, ("hold", "ramp"), key, out, unit_key=f"{key}.unit"
            )
            if g.unit == "fraction" and len(lengths) == 2 and g.hold + g.ramp > 1:
                out.append(
                    (
                        f"{key}.hold",
                        f"hold + ramp = {g.hold} + {g.ramp} of train.steps: more than the whole "
                        "run (leave hold out for a constant multiplier)",
                    )
                )
        elif g.ramp:
            out.append(
                (f"{key}.ramp", f"got {g.ramp} without a hold: a constant multiplier has no ramp")
            )
        label = group_label(g, m.num_layers)
        if label in labels:
            out.append(
                (
                    f"{key}.name",
                    f"{label!r} is also the name of {labels[label]}; give each group its own name",
                )
            )
        labels[label] = key
    coverage = group_coverage(recipe)
    for j, (key_b, label_b, cover_b) in enumerate(coverage):
        for key_a, label_a, cover_a in coverage[:j]:
            shared = sorted(
                (
                    (layer, part)
                    for layer in cover_a.keys() & cover_b.keys()
                    for part in cover_a[layer] & cover_b[layer]
                ),
                key=lambda x: (x[0] is not None, x),
            )
            if shared:
                where = ", ".join(
                    f"{p}@{layer}" if layer is not None else p for layer, p in shared[:4]
                )
                out.append(
                    (
                        key_b,
                        f"{label_b!r} overlaps {key_a} ({label_a!r}) on {where}: each element may "
                        "belong to one group only",
                    )
                )
    return out


def _adaptive_problems(recipe: Recipe) -> list[tuple[str, str]]:
    qk, a, out = recipe.qk, recipe.qk.adaptive, []
    steps = _lengths_in_steps(recipe, a, ("min_hold", "max_hold"), "qk.adaptive", out)
    if len(steps) == 2 and a.min_hold > a.max_hold:
        out.append(
            (
                "qk.adaptive.min_hold",
                f"got {a.min_hold}; it must be <= qk.adaptive.max_hold ({a.max_hold})",
            )
        )
    if qk.unit == "fraction" and a.max_hold <= 1 and a.max_hold + qk.ramp > 1:
        out.append(
            (
                "qk.adaptive.max_hold",
                f"max_hold + ramp = {a.max_hold} + {qk.ramp} of train.steps: more than "
                "the whole run, the slowdown might never end",
            )
        )
    try:
        layers = resolve_layers(qk.layers, recipe.model.num_layers)
    except ValueError:
        return out  # reported with qk.layers
    if layers and min(layers) == 0:
        out.append(
            (
                "qk.release",
                "adaptive needs at least one layer below the slowed ones to measure (qk.layers "
                f"selects {layers}, which includes layer 0)",
            )
        )
    return out
