"""Build megatron-core ``GPTModel``s from a recipe's model section.

GPT-2 style and LLaMA style are two corners of one space: FFN (gelu | swiglu), norm
(layernorm | rmsnorm), biases on/off, positions (learned | rope), GQA, QK-norm. Any mix builds.

``model.attention_backend`` picks the layer spec: ``te`` is megatron-core's Transformer Engine
spec; ``sdpa`` and ``local`` are its local spec with the core attention either torch's
``scaled_dot_product_attention`` (:class:`slowqk.attention.SDPAttention`) or megatron-core's own
``DotProductAttention`` (materializes the s x s scores); ``auto`` = ``te`` when TE imports and CUDA
is present, else ``sdpa``. All but ``te`` share parameter names and checkpoints.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.activations import fast_gelu  # the tanh approximation (GPT-2's "gelu_new")
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from slowqk.attention import SDPAttention

# padded_vocab_size is re-exported
from slowqk.config import ModelConfig, RecomputeConfig, padded_vocab_size  # noqa: F401
from slowqk.linear import DirectColumnParallelLinear, DirectRowParallelLinear
from slowqk.norms import TorchNorm
from slowqk.probe import probed_layer_spec


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_attention_backend(name: str) -> str:
    """``auto`` -> ``te`` or ``sdpa``; ``te`` without TE + CUDA is an error naming the key."""
    if name == "auto":
        return "te" if transformer_engine_available() else "sdpa"
    if name == "te" and not transformer_engine_available():
        raise ValueError(
            "model.attention_backend=te needs Transformer Engine and CUDA "
            f"(CUDA available: {torch.cuda.is_available()}); use auto, sdpa or local"
        )
    return name


def wrap_precision(model: torch.nn.Module, config: TransformerConfig) -> torch.nn.Module:
    """bf16 models run as Megatron-LM runs them: every parameter and buffer in bf16 (position
    embeddings and norms included), fp32 logits out of the last stage."""
    if config.bf16 or config.fp16:
        return Float16Module(config, model)
    return model


def unwrap_model(module: torch.nn.Module) -> GPTModel:
    """The ``GPTModel`` inside DDP / ``Float16Module`` wrappers."""
    while not isinstance(module, GPTModel):
        module = module.module
    return module


def build_transformer_config(
    model: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    precision: str = "fp32",
    fused_kernels: bool = False,
    recompute: RecomputeConfig | None = None,
    sequence_parallel: bool = False,
    virtual_pipeline: int | None = None,
) -> TransformerConfig:
    """``fused_kernels``: megatron-core's own fusions (no TE needed), those that keep the math:
    SwiGLU bias-activation, bias-dropout-add, the vocab-parallel cross-entropy. Its GELU fusion is
    not among them: it computes the tanh approximation, a different model than
    ``model.ffn=gelu``."""
    bf16 = precision == "bf16"
    use_te = resolve_attention_backend(model.attention_backend) == "te"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.hidden_size // model.num_attention_heads,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        normalization="RMSNorm" if model.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.ffn == "swiglu",
        activation_func=F.silu
        if model.ffn == "swiglu"
        else (fast_gelu if model.gelu == "tanh" else F.gelu),
        add_bias_linear=model.bias,
        add_qkv_bias=model.bias,
        qk_layernorm=model.qk_norm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Initialise full weights on CPU and scatter, so every TP layout starts from the
        # same numbers (TP=2 equals TP=1 from step 0).
        use_cpu_initialization=True,
        bias_activation_fusion=(use_te or fused_kernels) and model.ffn == "swiglu",
        bias_dropout_fusion=use_te or fused_kernels,
        cross_entropy_loss_fusion=fused_kernels,
        cross_entropy_fusion_impl="native",
        masked_softmax_fusion=use_te,  # megatron's masked-softmax kernels come with TE/apex builds
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=sequence_parallel,
        **recompute_options(recompute or RecomputeConfig()),
    )


def recompute_options(rc: RecomputeConfig) -> dict:
    """``train.recompute`` as megatron-core's TransformerConfig fields."""
    if rc.granularity == "none":
        return {}
    if rc.granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(rc.modules)}
    return {
        "recompute_granularity": "full",
        "recompute_method": rc.full_method,
        "recompute_num_layers": rc.full_num_layers,
    }


def layer_spec(model: ModelConfig, backend: str, probe: bool = False):
    """megatron-core's GPT layer spec for ``backend`` (resolved: te | sdpa | local)."""
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(
            qk_layernorm=model.qk_norm,
            normalization="RMSNorm" if model.norm == "rmsnorm" else "LayerNorm",
        )
        for name in ("input_layernorm", "pre_mlp_layernorm"):  # marked for sequence parallelism
            if getattr(spec.submodules, name) is WrappedTorchNorm:
                setattr(spec.submodules, name, TorchNorm)
        if backend == "sdpa":
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
        elif backend != "local":
            raise ValueError(f"attention backend {backend!r}: expected te, sdpa or local")
        _direct_linears(spec)
    if probe:
        spec = probed_layer_spec(spec)
    return spec


def _direct_linears(spec) -> None:
    """The local spec's four parallel linears as :mod:`slowqk.linear`'s subclasses (the same
    parameters; a direct matmul where a rank holds the whole weight)."""
    layer = spec.submodules
    for sub in (_submodules(layer.self_attention), _submodules(layer.mlp)):
        for name, stock, direct in (
            ("linear_qkv", ColumnParallelLinear, DirectColumnParallelLinear),
            ("linear_proj", RowParallelLinear, DirectRowParallelLinear),
            ("linear_fc1", ColumnParallelLinear, DirectColumnParallelLinear),
            ("linear_fc2", RowParallelLinear, DirectRowParallelLinear),
        ):
            if getattr(sub, name, None) is stock:  # the stock class, not one set elsewhere
                setattr(sub, name, direct)


def _submodules(spec):
    """A module spec's submodules: a ``ModuleSpec``'s field, or (megatron-core 0.19's MLP) the
    ``submodules`` keyword of a ``functools.partial``; None for anything else."""
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def replay_earlier_stages(
    model: ModelConfig, config: TransformerConfig, spec, vocab_size: int, vp_stage=None
) -> int:
    """Draw, and drop, the initial weights of what comes before this model chunk.

    megatron-core initializes each stage's modules from the same seeded generator in build order,
    so at PP=1 layer 2 draws after the embedding and layers 0-1, while a second stage starting at
    layer 2 draws first and gets other weights. Building the earlier modules here (one at a time,
    then freed) leaves the generators where PP=1 would have them: the same seed gives the same
    initial weights at any pipeline layout (TP already scatters weights drawn in full). With
    virtual stages the caller restores the seeded generators before each chunk
    (:func:`generator_restorer`). Returns the number of layers replayed."""
    if not parallel_state.model_parallel_is_initialized() or parallel_state.is_pipeline_first_stage(
        ignore_virtual=vp_stage is None, vp_stage=vp_stage
    ):
        return 0
    LanguageModelEmbedding(
        config=config,
        vocab_size=vocab_size,
        max_sequence_length=model.seq_length,
        position_embedding_type="rope" if model.position == "rope" else "learned_absolute",
    )
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    for _ in range(offset):
        build_module(spec, config=config, layer_number=1, vp_stage=vp_stage)
    return offset


def generator_restorer() -> Callable[[], None]:
    """A function that puts the generators that initialize weights (torch's and megatron-core's
    model-parallel tracker) back to where they are now."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = torch.get_rng_state(), tracker.get_states()

    def restore() -> None:
        torch.set_rng_state(saved[0])
        tracker.set_states(saved[1])

    return restore


def build_gpt_model(
    model: ModelConfig,
    config: TransformerConfig,
    vocab_size: int,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    probe: bool = False,
    vp_stage: int | None = None,
) -> GPTModel:
    """``model.attention_backend`` decides the spec (see :func:`resolve_attention_backend`); the
    initial weights do not depend on the pipeline layout (:func:`replay_earlier_stages`)."""
    backend = resolve_attention_backend(model.attention_backend)
    spec = layer_spec(model, backend, probe)
    replay_earlier_stages(model, config, spec, vocab_size, vp_stage)
    block = spec
    if backend != "te":  # the final norm from the same class as the layers' (megatron-core
        # takes the module-level default for a layer spec)
        block = TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
            layer_norm=TorchNorm,
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope" if model.position == "rope" else "learned_absolute",
        rotary_base=int(model.rotary_base),
        vp_stage=vp_stage,
    )


def build_model_chunks(
    model: ModelConfig, config: TransformerConfig, vocab_size: int, *, probe: bool = False
) -> list[GPTModel]:
    """This rank's model chunks: one, or one per virtual stage
    (``config.virtual_pipeline_model_parallel_size``), each drawing its initial weights as its
    layers would at PP=1 (the seeded generators restored before every chunk after the first)."""
    vpp = config.virtual_pipeline_model_parallel_size
    restore_generators = generator_restorer()
    chunks = []
    for vp in range(vpp) if vpp else [None]:
        if vp:
            restore_generators()
        chunks.append(
            build_gpt_model(
                model,
                config,
                vocab_size,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=vp is None, vp_stage=vp
                ),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=vp is None, vp_stage=vp
                ),
                probe=probe,
                vp_stage=vp,
            )
        )
    return chunks
