"""The recipe schema: typed sections (pydantic) with their defaults, ranges and one-field checks.

Checks across fields are in :mod:`slowqk.config.checks`, loading and overrides in
:mod:`slowqk.config.loading`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slowqk.config.base import RecipeError, StrictSection  # noqa: F401 - re-exported
from slowqk.config.layout import ParallelConfig, RecomputeConfig
from slowqk.qk.parts import Part


class ModelConfig(StrictSection):
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


class OptimizerConfig(StrictSection):
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


class LayerSelection(StrictSection):
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


class AdaptiveReleaseConfig(StrictSection):
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


class QKConfig(StrictSection):
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


PartName = Part  # the parts a learning-rate group can name (slowqk.qk.parts)


class LRGroupConfig(StrictSection):
    """One entry of ``lr_groups``: these parts of these layers train at ``lr x multiplier(step)``.

    The multiplier is ``mult`` for ``hold`` (in ``unit``), then returns to 1.0 over ``ramp`` with
    ``shape``, as in ``qk:``; without ``hold`` it stays ``mult`` for the whole run. With
    ``rule: quack`` each attention head has its own multiplier from the weights
    (:mod:`slowqk.qk.quack`).
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
    mult: float = Field(ge=0, description="the multiplier; rule=quack: QuacK's constant tau")
    rule: Literal["schedule", "quack"] = Field(
        "schedule",
        description="schedule: `mult` on hold and ramp; quack: per head, from the other "
        "projection's norm every step (slowqk.qk.quack; params [q, k])",
    )
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


class DataConfig(StrictSection):
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


class TrainConfig(StrictSection):
    steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    global_batch_size: int = Field(16, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    log_interval: int = Field(10, ge=1)
    eval_interval: int = Field(50, ge=1)
    eval_iters: int = Field(4, ge=1)
    eval_at_start: bool = Field(False, description="also evaluate before the first step")
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
    stop_check_interval: int = Field(
        1,
        ge=1,
        description="every this many steps the ranks agree whether a stop signal arrived (one "
        "all-reduce and one host read); a signal waits for the next such step",
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
    recompute: RecomputeConfig = Field(default_factory=RecomputeConfig)


class DiagnosticsConfig(StrictSection):
    """In-training probes of attention specialization (see slowqk.diagnostics for definitions)."""

    interval: int = Field(0, ge=0, description="every this many steps; 0 = off")
    log_spaced: bool = Field(
        False,
        description="probe also at steps 1, 2, 4, 8, ... below the interval (the early dynamics "
        "sit in the first tens of steps)",
    )
    steps: list[int] = Field(
        default_factory=list, description="probe also at these steps (with or without an interval)"
    )
    specialization_thresholds: list[float] = Field(
        default_factory=lambda: [0.95, 0.9, 0.85],
        description="a layer's specialization step is its first probe with normalized attention "
        "entropy below each of these (summary.json: specialization)",
    )
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


class Recipe(StrictSection):
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

    @property
    def declared_vocab_size(self) -> int:
        """The vocabulary the recipe alone names, before any tokenizer is read:
        ``model.vocab_size``, else the size the tokenizer is trained to."""
        return self.model.vocab_size or self.data.tokenizer_vocab_size


# ----------------------------------------------------------------------------- loading
