"""Typed recipe schema, YAML loading and ``key.sub=value`` overrides.

Every error names the key, the value it got and what is allowed, and is raised as
:class:`RecipeError` so the CLI can print one line and exit non-zero.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slowqk.qk.schedule import to_steps

# A wheel ships the recipes inside the package (slowqk/recipes); a checkout has them at the top
# level.
_PACKAGE = Path(__file__).resolve().parent
RECIPES_DIR = (
    _PACKAGE / "recipes" if (_PACKAGE / "recipes").is_dir() else _PACKAGE.parent / "recipes"
)


class RecipeError(ValueError):
    """A recipe or override is invalid; the message is meant for the user as is."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Decoder architecture; every part is an independent switch so ablation mixes can be built."""

    num_layers: int = Field(4, ge=1)
    hidden_size: int = Field(128, ge=8)
    num_attention_heads: int = Field(4, ge=1)
    num_query_groups: int | None = Field(None, ge=1, description="GQA groups; None = MHA")
    ffn_hidden_size: int | None = Field(
        None, ge=1, description="None = 4h (gelu) or ~8h/3 (swiglu)"
    )
    seq_length: int = Field(128, ge=2)
    ffn: Literal["gelu", "swiglu"] = "gelu"
    gelu: Literal["exact", "tanh"] = Field(
        "exact",
        description="the GELU of ffn=gelu: exact (erf) or the tanh approximation (GPT-2's "
        "released 'gelu_new')",
    )
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    bias: bool = True
    position: Literal["learned", "rope"] = "learned"
    qk_norm: bool = Field(
        False,
        description="normalize each head's query and key before the scores (megatron-core's "
        "qk_layernorm, with model.norm's kind): the field's usual guard against attention-logit "
        "growth",
    )
    rotary_base: float = Field(10000.0, gt=0)
    norm_epsilon: float = Field(1e-5, gt=0)
    init_method_std: float = Field(0.02, gt=0)
    hidden_dropout: float = Field(0.0, ge=0, lt=1)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = True
    vocab_size: int | None = Field(None, ge=2, description="None = the tokenizer's vocabulary")
    make_vocab_size_divisible_by: int = Field(128, ge=1)
    attention_backend: Literal["auto", "te", "sdpa", "local"] = Field(
        "auto",
        description="core attention: te (Transformer Engine), sdpa (torch "
        "scaled_dot_product_attention), "
        "local (megatron-core's DotProductAttention); auto = te when TE imports on CUDA, else sdpa",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({groups})"
            )
        return self

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.ffn == "swiglu":  # keep parameter count close to the 4h GELU MLP
            return int(64 * ((8 * self.hidden_size // 3 + 63) // 64))
        return 4 * self.hidden_size


class ParallelConfig(_Strict):
    tensor: int = Field(1, ge=1)
    pipeline: int = Field(1, ge=1)
    distributed_optimizer: bool = True
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    engine: Literal["megatron", "deepspeed"] = Field(
        "megatron",
        description="data-parallel engine: megatron-core DDP/optimizers, or DeepSpeed ZeRO "
        "(TP=PP=1)",
    )
    zero_stage: int = Field(1, ge=1, le=3, description="DeepSpeed ZeRO stage (engine=deepspeed)")


class OptimizerConfig(_Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    sgd_momentum: float = Field(0.9, ge=0, lt=1)
    clip_grad: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "wsd", "constant", "linear"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1)

    @model_validator(mode="after")
    def _min_le_max(self) -> OptimizerConfig:
        if self.min_lr > self.lr:
            raise ValueError(
                f"optimizer.min_lr ({self.min_lr}) must be <= optimizer.lr ({self.lr})"
            )
        return self


class LayerSelection(_Strict):
    """Which layers count as "upper": exactly one of top / top_fraction / indices."""

    top: int | None = Field(None, ge=1)
    top_fraction: float | None = Field(None, gt=0, le=1)
    indices: list[int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> LayerSelection:
        given = [k for k in ("top", "top_fraction", "indices") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"layers needs exactly one of top, top_fraction, indices; got {given or 'none'}"
            )
        if self.indices is not None and any(i < 0 for i in self.indices):
            raise ValueError(f"layers.indices must be >= 0, got {self.indices}")
        return self


class AdaptiveReleaseConfig(_Strict):
    """``qk.release: adaptive``: release when the lower layers' drift has settled
    (slowqk.qk.release)."""

    min_hold: float = Field(0.02, ge=0, description="never release before this, in qk.unit")
    max_hold: float = Field(0.1, ge=0, description="release here at the latest, in qk.unit")
    threshold: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="settled = smoothed lower-layer drift at most this fraction of its peak",
    )
    smoothing: float = Field(
        0.9, ge=0, lt=1, description="EMA factor of the per-step drift (bias-corrected)"
    )


class QKConfig(_Strict):
    """The intervention: slow the upper layers' W_Q and W_K for a while, then release."""

    enabled: bool = False
    layers: LayerSelection = Field(default_factory=lambda: LayerSelection(top_fraction=0.5))
    mult_q: float = Field(0.25, ge=0)
    mult_k: float = Field(0.25, ge=0)
    unit: Literal["fraction", "steps", "tokens"] = "fraction"
    hold: float = Field(0.04, ge=0, description="length of the hold, in `unit`")
    ramp: float = Field(0.01, ge=0, description="length of the return to 1.0, in `unit`")
    shape: Literal["linear", "cosine", "step"] = "linear"
    release: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="fixed: ramp after `hold`; adaptive: ramp once the lower layers settle "
        "(qk.adaptive)",
    )
    adaptive: AdaptiveReleaseConfig = Field(default_factory=AdaptiveReleaseConfig)


PartName = Literal["q", "k", "v", "o", "gate", "up", "fc1", "fc2", "norm", "embedding", "output"]


class LRGroupConfig(_Strict):
    """One entry of ``lr_groups``: these parts of these layers train at ``lr x multiplier(step)``.

    The multiplier is ``mult`` for ``hold`` (in ``unit``), then returns to 1.0 over ``ramp`` with
    ``shape``, as in ``qk:``; without ``hold`` it stays ``mult`` for the whole run.
    """

    name: str | None = Field(
        None,
        description="label in step records, TensorBoard and summaries; "
        "default: the params and layers, e.g. 'v@2-3'",
    )
    params: list[PartName] = Field(min_length=1)
    layers: LayerSelection | None = Field(
        None, description="as qk.layers; None = every layer (not used for embedding/output)"
    )
    mult: float = Field(ge=0)
    unit: Literal["fraction", "steps", "tokens"] = "fraction"
    hold: float | None = Field(
        None, ge=0, description="length at `mult`, in `unit`; None = the whole run"
    )
    ramp: float = Field(0.0, ge=0, description="length of the return to 1.0, in `unit`")
    shape: Literal["linear", "cosine", "step"] = "linear"

    @model_validator(mode="before")
    @classmethod
    def _one_param_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("params"), str):
            data = {**data, "params": [data["params"]]}
        return data


class DataConfig(_Strict):
    """Where tokens come from: a sharded dataset directory, indexed-dataset prefixes, or a text
    corpus prepared on first use."""

    dataset: str | list[str] | None = Field(
        None,
        description="directory (or list, blended by train_weights) made by `slowqk data shard`",
    )
    corpus: str | None = Field(
        None, description="a text file; tokenized into out_dir/data on first use"
    )
    valid_fraction: float = Field(0.1, gt=0, lt=1)
    tokenizer: str | None = Field(None, description="sentencepiece .model; None = train one")
    tokenizer_vocab_size: int = Field(2048, ge=64)
    train_prefixes: list[str] = Field(default_factory=list)
    valid_prefixes: list[str] = Field(default_factory=list)
    train_weights: list[float] | None = None
    verify: bool = Field(
        True,
        description="when a dataset opens, check every shard file's sha256 against its manifest "
        "(reads the whole dataset once per start; false = only the structural checks: sizes, "
        "index, counts)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        sources = [x for x in ("dataset", "corpus") if getattr(self, x) is not None]
        if self.train_prefixes:
            sources.append("train_prefixes")
        if len(sources) != 1:
            raise ValueError(
                "data needs exactly one of data.dataset, data.corpus or data.train_prefixes; got "
                f"{sources or 'none'}"
            )
        if self.train_weights is not None:
            what = "data.dataset" if self.dataset is not None else "data.train_prefixes"
            n = (
                len(self.dataset)
                if isinstance(self.dataset, list)
                else (1 if self.dataset else len(self.train_prefixes))
            )
            if len(self.train_weights) != n:
                raise ValueError(
                    f"data.train_weights has {len(self.train_weights)} entries, {what} has {n}"
                )
        return self


class TrainConfig(_Strict):
    steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    global_batch_size: int = Field(16, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    log_interval: int = Field(10, ge=1)
    eval_interval: int = Field(50, ge=1)
    eval_iters: int = Field(4, ge=1)
    save_interval: int | None = Field(None, ge=1)
    dist_timeout: float = Field(
        600.0,
        gt=0,
        description="seconds a rank waits for its peers (process-group creation and every "
        "collective) before it stops with one line naming the step, exit 4; torch's own default "
        "is 30 min",
    )
    init_from: str | None = Field(
        None,
        description="start from these weights (a checkpoint or checkpoint root, e.g. from "
        "import-hf); fresh optimizer, step 0; ignored when the run resumes from its own checkpoint",
    )
    keep_last: int = Field(2, ge=1)
    keep_every: int | None = Field(
        None, ge=1, description="checkpoints at multiples of this are never pruned"
    )
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_consecutive_skips: int = Field(
        5, ge=1, description="stop after this many non-finite steps in a row"
    )
    progress_bar: bool = True
    tensorboard: bool = True
    fused_kernels: bool = Field(
        False,
        description="megatron-core's fused kernels that need no Transformer Engine "
        "(torch.compile): SwiGLU bias-activation, bias-dropout-add, vocab-parallel cross-entropy; "
        "exact, off until measured to help",
    )
    compile: bool = Field(
        False,
        description="torch.compile the whole model in place, one graph from the embedding to the "
        "loss (megatron engine; one rank or data parallel); the first steps pay the compilation",
    )


class DiagnosticsConfig(_Strict):
    """In-training probes of attention specialization (see slowqk.diagnostics for definitions)."""

    interval: int = Field(0, ge=0, description="every this many steps; 0 = off")
    probe_samples: int = Field(4, ge=1, description="fixed validation samples the probe runs on")
    warn: bool = Field(
        True,
        description="log a warning when the upper layers' attention specializes early "
        "(slowqk.early_warning)",
    )
    warn_entropy_gap: float = Field(
        0.1,
        gt=0,
        le=1,
        description="warn when the upper layers' entropy fell this "
        "much more than the lower layers' since the first probe, while they still drift",
    )


def padded_vocab_size(vocab_size: int, multiple: int, tensor_parallel: int) -> int:
    """Pad the vocabulary to a multiple of ``multiple`` that the tensor-parallel size divides.

    Unlike Megatron-LM's ``multiple * TP`` this keeps the embedding shape the same across TP sizes
    that divide ``multiple`` (1, 2, 4, 8 with the default 128), so checkpoints reshard between them.
    """
    step = math.lcm(multiple, tensor_parallel)
    return ((vocab_size + step - 1) // step) * step


def architecture(model: ModelConfig) -> dict[str, Any]:
    """The model fields that decide the weights' shapes and meaning (what init_from must match)."""
    keys = [
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "ffn",
        "gelu",
        "norm",
        "bias",
        "position",
        "qk_norm",
        "tie_embeddings",
    ]
    out = {k: getattr(model, k) for k in keys}
    out["num_query_groups"] = model.num_query_groups or model.num_attention_heads
    out["ffn_hidden_size"] = model.ffn_size
    if model.position == "learned":
        out["seq_length"] = model.seq_length  # rows of the position embedding
    return out


class Recipe(_Strict):
    name: str = "run"
    seed: int = 1234
    out_dir: str = "runs/${name}"
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    qk: QKConfig = Field(default_factory=QKConfig)
    lr_groups: list[LRGroupConfig] = Field(
        default_factory=list,
        description="learning-rate groups of any part of any layer (slowqk.lr_groups)",
    )
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.replace("${name}", self.name))

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.model.seq_length


# ----------------------------------------------------------------------------- loading


def _origin(source: str, overrides: list[str]) -> Callable[[str], str]:
    """Where a key's value came from: the override that set it (or a part of it), else the file."""
    keys = {".".join(parse_override(text)[0]): text for text in overrides}

    def origin(key: str) -> str:
        for k, text in reversed(keys.items()):  # the last override of a key wins, as when applied
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return f"override {text!r}"
        return source

    return origin


def _format_validation_error(err: ValidationError, origin: Callable[[str], str]) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<recipe>"
        shown = repr(key)  # quoted, with newlines and other control characters escaped
        where = origin(key)
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key {shown}{_suggest(e['loc'])}")
            continue
        msg = (
            e["msg"]
            .removeprefix("Value error, ")
            .removeprefix("Input should be ")
            .replace("\n", " ")
        )
        got = e.get("input")
        if e["type"] == "missing":
            lines.append(f"{where}: missing required key {shown}")
        elif isinstance(got, dict):
            lines.append(f"{where}: key {shown}: {msg}")
        else:
            lines.append(f"{where}: key {shown}: got {got!r}; expected {msg}")
    return "; ".join(lines)  # one line, whatever the number of problems


def _suggest(loc: tuple) -> str:
    """Closest valid key name at the same nesting level, if one is close."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return ""
        if not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; allowed: {', '.join(allowed)}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {text!r}: empty key component in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(
                    f"override {text!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = child
        node[parts[-1]] = value
    return data


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    candidates = [path, RECIPES_DIR / path, RECIPES_DIR / f"{name_or_path}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise RecipeError(
        f"recipe {name_or_path!r} not found; known recipes: {', '.join(known_recipes())}"
    )


def known_recipes() -> list[str]:
    """Names of the bundled recipes (experiment grids, which sit beside them, are not recipes)."""
    names = []
    for p in sorted(RECIPES_DIR.rglob("*.yaml")):
        data = yaml.safe_load(p.read_text()) or {}
        if isinstance(data, dict) and "arms" not in data:
            names.append(str(p.relative_to(RECIPES_DIR).with_suffix("")))
    return names


def load_recipe_dict(name_or_path: str) -> tuple[dict, str]:
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:  # single inheritance: `base: tiny/gpt` then deep-merge this file on top
        parent, _ = load_recipe_dict(str(base))
        data = _deep_merge(parent, data)
    return data, str(path)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def build_recipe(
    data: dict, source: str = "<recipe>", overrides: list[str] | None = None
) -> Recipe:
    """Validate ``data``; errors name the key and where its value came from (``source`` or the
    override among ``overrides`` that set it)."""
    origin = _origin(source, list(overrides or []))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, origin)) from None
    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError("; ".join(f"{origin(key)}: key {key!r}: {msg}" for key, msg in problems))
    return recipe


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


def group_label(group: LRGroupConfig, num_layers: int) -> str:
    """A group's name: its own, or its params and layers (``v@2-3``, ``q+k@0,2``, ``embedding``)."""
    if group.name:
        return group.name
    label = "+".join(group.params)
    layer_parts = [p for p in group.params if p not in ("embedding", "output")]
    if layer_parts and group.layers is not None:
        layers = resolve_layers(group.layers, num_layers)
        if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
            label += f"@{layers[0]}-{layers[-1]}"
        else:
            label += "@" + ",".join(map(str, layers))
    return label


def resolve_layers(sel: LayerSelection | None, num_layers: int) -> list[int]:
    """0-based indices a layer selection names; ``None`` is every layer."""
    # deferred: it imports torch, which loading a recipe (and the CLI's start) does not need
    from slowqk.qk.selection import select_layers

    if sel is None:
        return list(range(num_layers))

    return select_layers(
        num_layers, top=sel.top, top_fraction=sel.top_fraction, indices=sel.indices
    )


def group_coverage(recipe: Recipe) -> list[tuple[str, str, dict[int | None, set[str]]]]:
    """``(key, label, {layer or None: atoms})`` for ``qk`` (when enabled) and every ``lr_groups``
    entry whose layers are valid; ``None`` is the model (embedding, output)."""
    # deferred: a circular import at module level
    from slowqk.qk.parts import MODEL_PARTS, atoms

    m = recipe.model
    gated = m.ffn == "swiglu"
    out = []
    entries: list[tuple[str, str, list[str], LayerSelection | None]] = []
    if recipe.qk.enabled:
        entries.append(("qk", "qk", ["q", "k"], recipe.qk.layers))
    for i, g in enumerate(recipe.lr_groups):
        try:
            label = group_label(g, m.num_layers)
        except ValueError:
            continue  # reported with the entry's layers
        entries.append((f"lr_groups.{i}", label, list(g.params), g.layers))
    for key, label, parts, sel in entries:
        try:
            layers = resolve_layers(sel, m.num_layers)
        except ValueError:
            continue  # reported with the section's layers
        cover: dict[int | None, set[str]] = {}
        for part in parts:
            for layer in [None] if part in MODEL_PARTS else layers:
                cover.setdefault(layer, set()).update(atoms(part, gated))
        out.append((key, label, cover))
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
        # deferred: a circular import at module level
        from slowqk.qk.parts import atoms

        pieces = [atoms(p, m.ffn == "swiglu") for p in g.params]
        if sum(map(len, pieces)) != len(set().union(*pieces)):
            out.append(
                (
                    f"{key}.params",
                    f"got {g.params}; each element once (fc1 of a gated FFN is gate and up)",
                )
            )
        if g.hold is not None:
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


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    data, source = load_recipe_dict(name_or_path)
    data = apply_overrides(data, list(overrides or []))
    return build_recipe(data, source, overrides)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# Recipe fields that may change when a run resumes: they do not alter what is computed.
RESUME_SAFE_PREFIXES = (
    "name",
    "out_dir",
    "parallel.",
    "train.log_interval",
    "train.eval_interval",
    "train.eval_iters",
    "train.save_interval",
    "train.keep_last",
    "train.keep_every",
    "train.progress_bar",
    "train.tensorboard",
    "train.on_nonfinite",
    "train.max_consecutive_skips",
    "diagnostics.",
    "model.attention_backend",
    "train.fused_kernels",  # the same math through other kernels
    "train.compile",
    "data.verify",
    "train.dist_timeout",
)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_altering_changes(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for each change between two recipe dumps that alters the run."""
    a, b = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(a.keys() | b.keys()):
        if key not in a and b[key] in (
            [],
            False,
        ):  # added since, at its off default (lr_groups, qk_norm)
            continue
        if a.get(key) != b.get(key) and not key.startswith(RESUME_SAFE_PREFIXES):
            changes.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changes
