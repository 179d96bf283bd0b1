"""How a run is laid out over devices and what it trades for memory: tensor, pipeline and data
parallelism, the engine, and the scale knobs (sequence parallelism, overlapped communication,
activation recomputation)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slowqk.config.base import StrictSection


class ParallelConfig(StrictSection):
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

    # the scale knobs (Megatron-LM's names); what cannot compose is refused in config.checks
    virtual_pipeline: int | None = Field(
        None,
        ge=2,
        description="model chunks per pipeline rank (the interleaved 1F1B schedule; "
        "model.num_layers divisible by pipeline x this)",
    )
    context_parallel: int = Field(
        1,
        ge=1,
        description="ranks that split each sequence for attention (megatron-core's "
        "context_parallel_size); refused above 1 in this version: see the check's message",
    )
    sequence_parallel: bool = Field(
        False,
        description="split the activations outside attention and the MLP along the sequence over "
        "the tensor-parallel ranks (needs parallel.tensor > 1)",
    )
    overlap_grad_reduce: bool = Field(
        False,
        description="reduce (or reduce-scatter) each gradient bucket as soon as its gradients are "
        "ready, overlapping the backward pass",
    )
    overlap_param_gather: bool = Field(
        False,
        description="all-gather the updated parameters asynchronously, overlapping the next "
        "forward pass (needs the distributed optimizer and overlap_grad_reduce)",
    )
    bucket_size: int | None = Field(
        None,
        ge=1,
        description="elements per gradient bucket; None: megatron-core's default (with overlap, "
        "max(40M, 1M x data-parallel size); without, one bucket)",
    )


RecomputeModule = Literal["core_attn", "layernorm", "mlp"]


class RecomputeConfig(StrictSection):
    """Activation recomputation (megatron-core's ``recompute_*``): keep fewer activations for the
    backward pass and compute them again there."""

    granularity: Literal["none", "selective", "full"] = Field(
        "none",
        description="selective: recompute recompute.modules of every layer; full: whole layers "
        "(recompute.method and recompute.num_layers)",
    )
    method: Literal["uniform", "block"] | None = Field(
        None,
        description="full only: uniform recomputes every layer from the input of each group of "
        "num_layers; block recomputes the first num_layers layers of each pipeline stage. Default "
        "uniform",
    )
    num_layers: int | None = Field(
        None, ge=1, description="full only: see recompute.method; default 1"
    )
    modules: list[RecomputeModule] = Field(
        default_factory=lambda: ["core_attn"],
        description="selective only: the parts of each layer to recompute",
    )

    @property
    def full_method(self) -> Literal["uniform", "block"]:
        """``method`` of full recomputation, uniform where the recipe leaves it open."""
        return self.method or "uniform"

    @property
    def full_num_layers(self) -> int:
        """``num_layers`` of full recomputation, 1 (Megatron-LM's usual) where left open."""
        return self.num_layers or 1
