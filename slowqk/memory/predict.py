"""Per-GPU memory of a recipe's layout, predicted from its shapes: parameters, gradients,
optimizer state and the activations kept for the backward pass.

Parameters, gradients and optimizer state are counted exactly as megatron-core allocates them:
each pipeline stage's parameters in the model's order, split over tensor ranks, laid out in
megatron-core's gradient buffer (with the distributed optimizer every parameter starts at a
multiple of 64 elements and every bucket ends at a multiple of lcm(DP, 128)), the optimizer's
Adam moments and fp32 main weights over the elements of each data-parallel rank's shard.

Activations follow Korthikanti et al. 2022 (arXiv 2205.05198), term by term for the layers
megatron-core's local spec builds (``sdpa`` and ``local`` attention; Transformer Engine's fused
layers keep about the same tensors): what each operation saves, with torch's composite RMSNorm,
GQA, rotary embeddings and the gated FFN counted. Sequence parallelism divides what lies outside
attention and the MLP by the tensor ranks; recomputation keeps only the inputs of what it redoes;
the first pipeline stage holds ``min(PP, micro-batches)`` micro-batches in flight, times
``1 + (PP - 1) / (PP * VPP)`` with virtual stages (Megatron-LM's theoretical memory report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slowqk.config import Recipe, padded_vocab_size

FP32 = 4


@dataclass(frozen=True)
class Device:
    """What differs between the CPU this is checked on and a GPU: dropout keeps a mask of the
    activations' dtype on CPU (torch's composite dropout) and of one byte on CUDA."""

    name: str = "cuda"

    @property
    def mask_bytes_per_element(self) -> int | None:  # None: the activations' own size
        return 1 if self.name == "cuda" else None


CUDA, CPU = Device("cuda"), Device("cpu")


@dataclass
class StageMemory:
    """One pipeline stage's bytes on each of its GPUs."""

    stage: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    activations_per_layer: int
    layers: int
    in_flight: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def stage_parameters(recipe: Recipe, stage: int, vocab: int) -> list[list[tuple[str, int]]]:
    """(name, elements on one tensor rank) of one pipeline stage's parameters, for each of its
    virtual chunks in the order megatron-core's ``GPTModel.named_parameters()`` gives them."""
    m, par = recipe.model, recipe.parallel
    t, p = par.tensor, par.pipeline
    v = par.virtual_pipeline or 1
    h, d, a, g = (
        m.hidden_size,
        m.hidden_size // m.num_attention_heads,
        m.num_attention_heads,
        (m.num_query_groups or m.num_attention_heads),
    )
    f = m.ffn_size
    vp = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, t)
    norm = 2 if m.norm == "layernorm" else 1  # torch's LayerNorm has a bias, RMSNorm none
    per_chunk = m.num_layers // (p * v)
    out: list[list[tuple[str, int]]] = []
    for chunk in range(v):
        first, last = stage == 0 and chunk == 0, stage == p - 1 and chunk == v - 1
        params: list[tuple[str, int]] = []
        if first:
            params.append(("embedding.word_embeddings.weight", vp // t * h))
            if m.position == "learned":
                params.append(("embedding.position_embeddings.weight", m.seq_length * h))
        for _ in range(per_chunk):
            layer = [("input_layernorm", norm * h), ("linear_proj.weight", h * a * d // t)]
            if m.bias:
                layer.append(("linear_proj.bias", h))
            layer.append(("linear_qkv.weight", (a + 2 * g) * d // t * h))
            if m.bias:
                layer.append(("linear_qkv.bias", (a + 2 * g) * d // t))
            if m.qk_norm:
                layer += [("q_layernorm", norm * d), ("k_layernorm", norm * d)]
            fc1 = (2 if m.ffn == "swiglu" else 1) * f // t
            layer += [("pre_mlp_layernorm", norm * h), ("linear_fc1.weight", fc1 * h)]
            if m.bias:
                layer.append(("linear_fc1.bias", fc1))
            layer.append(("linear_fc2.weight", h * f // t))
            if m.bias:
                layer.append(("linear_fc2.bias", h))
            params += _split_norms(layer, norm)
        if last:
            params += _split_norms([("final_layernorm", norm * h)], norm)
            if not m.tie_embeddings or p > 1:  # a tied last stage keeps its own copy
                params.append(("output_layer.weight", vp // t * h))
        out.append(params)
    return out


def _split_norms(params: list[tuple[str, int]], norm: int) -> list[tuple[str, int]]:
    """A norm's weight and bias are two parameters."""
    out = []
    for name, n in params:
        if name.endswith("layernorm"):
            out += [(f"{name}.weight", n // norm)] + ([(f"{name}.bias", n // norm)] * (norm - 1))
        else:
            out.append((name, n))
    return out


# the two copies of a tied embedding, each in its own gradient bucket when a pipeline splits them
_EMBEDDING_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class BufferLayout:
    """megatron-core's gradient buffer of one model chunk: elements, and each parameter's range."""

    numel: int
    buckets: list[tuple[int, int]]
    ranges: list[tuple[int, int]]


def buffer_layout(
    sizes: list[int], shared: list[bool], distributed: bool, dp: int, bucket_size: int | None
) -> BufferLayout:
    """Parameters go in backward order; with the distributed optimizer each starts at a multiple
    of 64 elements and each bucket ends at a multiple of lcm(DP, 128); a shared embedding gets a
    bucket of its own (as ``_ParamAndGradBuffer`` lays them out)."""

    def pad(n: int, k: int) -> int:
        return -(-n // k) * k

    end_pad = math.lcm(dp, 128) if distributed else 1
    start_pad = 64 if distributed else 1
    buckets, ranges = [], []
    start = bucket_start = 0
    members = 0
    for n, own in zip(sizes[::-1], shared[::-1], strict=True):
        start = pad(start, start_pad)
        if own and distributed and members:
            start = pad(start, end_pad)
            buckets.append((bucket_start, start))
            bucket_start, members = start, 0
        ranges.append((start, start + n))
        members += 1
        end = start + n
        if (bucket_size is not None and end - bucket_start >= bucket_size) or (own and distributed):
            start = pad(end, end_pad)
            buckets.append((bucket_start, start))
            bucket_start, members = start, 0
        else:
            start = end
    if members:
        buckets.append((bucket_start, pad(end, end_pad)))
    return BufferLayout(buckets[-1][1], buckets, ranges)


def _shard_elements(layout: BufferLayout, dp: int) -> int:
    """The most parameter elements any data-parallel rank's optimizer shard holds."""
    most = 0
    for r in range(dp):
        held = 0
        for b0, b1 in layout.buckets:
            size = (b1 - b0) // dp
            lo, hi = b0 + r * size, b0 + (r + 1) * size
            held += sum(max(0, min(hi, e) - max(lo, s)) for s, e in layout.ranges)
        most = max(most, held)
    return most


def state_bytes(recipe: Recipe, stage: int, vocab: int, data_parallel: int) -> dict[str, int]:
    """Parameter, gradient-buffer and optimizer-state bytes on one GPU of ``stage``."""
    par, bf16 = recipe.parallel, recipe.train.precision == "bf16"
    dp = data_parallel
    param_bytes = 2 if bf16 else FP32
    grads = optimizer = parameters = 0
    moments = FP32 * 2 + (FP32 if bf16 else 0)  # Adam's two moments, fp32 main weights
    tied_across_stages = recipe.model.tie_embeddings and par.pipeline > 1
    for i, chunk in enumerate(stage_parameters(recipe, stage, vocab)):
        sizes = [n for _, n in chunk]
        shared = [tied_across_stages and name in _EMBEDDING_NAMES for name, _ in chunk]
        bucket = None
        if par.overlap_grad_reduce and i == 0 and stage == 0:
            bucket = par.bucket_size or max(40_000_000, 1_000_000 * dp)
        layout = buffer_layout(sizes, shared, par.distributed_optimizer, dp, bucket)
        grads += layout.numel * FP32  # gradients reduced in fp32
        if par.distributed_optimizer:
            parameters += layout.numel * param_bytes  # the contiguous parameter buffer
            optimizer += _shard_elements(layout, dp) * moments
        else:
            parameters += sum(sizes) * param_bytes
            optimizer += sum(sizes) * moments
    return {"parameters": parameters, "gradients": grads, "optimizer": optimizer}


def layer_activation_terms(recipe: Recipe, device: Device = CUDA) -> dict[str, int]:
    """Bytes one transformer layer saves for backward per micro-batch on one tensor rank, term by
    term, before recomputation."""
    m, t = recipe.model, recipe.parallel.tensor
    sp, e = _sequence_split(recipe), _act_bytes(recipe)
    mask = device.mask_bytes_per_element or e
    s, b, h = m.seq_length, recipe.train.micro_batch_size, m.hidden_size
    a, d = m.num_attention_heads, m.hidden_size // m.num_attention_heads
    g = m.num_query_groups or a
    f = m.ffn_size
    sbh = s * b * h
    local = m.attention_backend == "local"

    stat = _layernorm_stat_bytes(device, e)

    def norm_terms(rows: int, width: int) -> int:
        return _norm_bytes(m.norm, rows, width, e, stat)

    terms = {
        "input_norm": norm_terms(s * b // sp, h),
        "qkv_input": sbh // sp * e,
        "qkv_output": s * b * (a + 2 * g) * d // t * e,
        "attention_output": s * b * a * d // t * e,  # the projection's input
        "pre_mlp_norm": norm_terms(s * b // sp, h),
        "fc1_input": sbh // sp * e,
        "fc2_input": s * b * f // t * e,
    }
    if m.qk_norm:
        terms["qk_norm"] = _qk_norm_bytes(m.norm, s * b, a // t, g // t, d, e, stat)
        if m.position != "rope":  # the normalized q and k, the attention's inputs
            terms["qk_norm"] += s * b * (a + g) * d // t * e
    if m.position == "rope":  # rotated q and k, the cos and sin tables of each
        terms["rope"] = s * b * (a + g) * d // t * e + 4 * s * d * e
    # the core attention's own: flash kernels keep a log-sum-exp per query; megatron-core's
    # local attention the softmax output, the causal mask and, with dropout, its mask and output
    if local:
        probs = b * a // t * s * s
        terms["attention_scores"] = probs * e + s * s
        if m.attention_dropout > 0:
            terms["attention_scores"] += probs * (mask + e)
    else:
        terms["attention_scores"] = b * a // t * s * FP32
    # the MLP's activation: GELU keeps its input; SwiGLU the fc1 output (gate and up), the
    # SiLU output and megatron-core's offset-added up half
    terms["mlp_activation"] = s * b * f // t * e * (4 if m.ffn == "swiglu" else 1)
    if m.hidden_dropout > 0:
        terms["hidden_dropout"] = 2 * sbh // sp * mask
    return terms


def _layernorm_stat_bytes(device: Device, e: int) -> int:
    """LayerNorm's mean and rstd: fp32 on CUDA, the input's dtype on CPU."""
    return FP32 if device.name == "cuda" else e


def _norm_bytes(norm: str, rows: int, width: int, e: int, stat: int) -> int:
    """LayerNorm keeps its input and its mean and rstd; torch's composite RMSNorm computes in
    fp32 and keeps the upcast input, the normalized input and the rstd, all fp32."""
    if norm == "layernorm":
        return rows * width * e + 2 * rows * stat
    return 2 * rows * width * FP32 + rows * FP32


def _qk_norm_bytes(norm: str, rows: int, a: int, g: int, d: int, e: int, stat: int) -> int:
    """Each head's q and k normalized. k (and q without GQA) are views of the saved QKV output,
    so a norm that keeps its input as it is adds nothing for them; with GQA q is a copy. torch's
    RMSNorm keeps an fp32 upcast (a copy unless the input is fp32), the normalized input and the
    rstd; LayerNorm its input and fp32 mean and rstd."""
    q_copy = rows * a * d if a != g else 0
    heads = rows * (a + g)
    if norm == "layernorm":
        return q_copy * e + 2 * heads * stat
    upcast = q_copy * FP32 if e == FP32 else heads * d * FP32
    return upcast + heads * d * FP32 + heads * FP32


def layer_activation_bytes(recipe: Recipe, device: Device = CUDA) -> int:
    """One layer's saved bytes per micro-batch, averaged over the layers, with
    ``train.recompute`` applied."""
    terms = layer_activation_terms(recipe, device)
    rc = recipe.train.recompute
    if rc.granularity == "none":
        return sum(terms.values())
    if rc.granularity == "selective":
        dropped = set()
        if "core_attn" in rc.modules:  # the checkpoint keeps q, k, v and the output anyway
            dropped.add("attention_scores")
        if "mlp" in rc.modules:  # keeps the MLP's input
            dropped |= {"mlp_activation", "fc2_input"}
        return sum(v for k, v in terms.items() if k not in dropped)
    # full: a group of layers keeps its input hidden states only; block recomputes the first
    # num_layers of each stage's chunk and keeps the rest whole
    par = recipe.parallel
    group_input = recipe.model.seq_length * recipe.train.micro_batch_size
    group_input = group_input * recipe.model.hidden_size // _sequence_split(recipe)
    group_input *= _act_bytes(recipe)
    n = rc.full_num_layers
    per_chunk = recipe.model.num_layers // (par.pipeline * (par.virtual_pipeline or 1))
    if rc.full_method == "uniform":
        return group_input * math.ceil(per_chunk / n) // per_chunk
    recomputed = min(n, per_chunk)
    whole = sum(terms.values())
    return (group_input * recomputed + whole * (per_chunk - recomputed)) // per_chunk


def input_edge_bytes(recipe: Recipe, device: Device = CUDA) -> int:
    """The first stage's own per micro-batch: token and position ids (int64), and the
    embedding dropout's mask."""
    m, e, sp = recipe.model, _act_bytes(recipe), _sequence_split(recipe)
    s, b = m.seq_length, recipe.train.micro_batch_size
    out = 2 * s * b * 8
    if m.hidden_dropout > 0:
        out += s * b * m.hidden_size // sp * (device.mask_bytes_per_element or e)
    return out


def output_edge_bytes(recipe: Recipe, vocab: int, device: Device = CUDA) -> int:
    """The last stage's own per micro-batch: the final norm, the output layer's input, the
    cross-entropy's fp32 softmax over the vocabulary and the labels."""
    m, t = recipe.model, recipe.parallel.tensor
    e, sp = _act_bytes(recipe), _sequence_split(recipe)
    s, b, h = m.seq_length, recipe.train.micro_batch_size, m.hidden_size
    vp = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, t)
    norm = _norm_bytes(m.norm, s * b // sp, h, e, _layernorm_stat_bytes(device, e))
    return norm + s * b * h // sp * e + s * b * vp // t * FP32 + s * b * 8


def _act_bytes(recipe: Recipe) -> int:
    return 2 if recipe.train.precision == "bf16" else FP32


def _sequence_split(recipe: Recipe) -> int:
    """What divides the activations outside attention and the MLP: the tensor ranks under
    sequence parallelism."""
    return recipe.parallel.tensor if recipe.parallel.sequence_parallel else 1


def recompute_working_set(recipe: Recipe, device: Device = CUDA) -> int:
    """Full recomputation rebuilds a group's activations in the backward pass and holds them
    while it differentiates the group: ``num_layers`` whole layers (uniform), one (block)."""
    rc = recipe.train.recompute
    if rc.granularity != "full":
        return 0
    whole = sum(layer_activation_terms(recipe, device).values())
    return whole * (rc.full_num_layers if rc.full_method == "uniform" else 1)


def in_flight(recipe: Recipe, stage: int, micro_batches: int) -> tuple[int, int]:
    """(micro-batches of one chunk in flight, layers per chunk) at ``stage``'s peak: 1F1B keeps
    ``PP - stage`` micro-batches; the interleaved schedule warms up ``2 (PP - stage - 1) +
    (VPP - 1) PP + 1`` chunk-micro-batches (on stage 0, Megatron-LM's ``1 + (PP-1)/(PP VPP)``
    times the stage's layers)."""
    p, v = recipe.parallel.pipeline, recipe.parallel.virtual_pipeline or 1
    per_chunk = recipe.model.num_layers // (p * v)
    if v == 1:
        return min(p - stage, micro_batches), per_chunk
    return min(2 * (p - stage - 1) + (v - 1) * p + 1, micro_batches * v), per_chunk


def memory_report(
    recipe: Recipe, gpus: int, vocab: int, device: Device = CUDA
) -> list[StageMemory]:
    """Each pipeline stage's bytes per GPU on ``gpus`` GPUs."""
    par, tr = recipe.parallel, recipe.train
    dp = gpus // (par.tensor * par.pipeline)
    micro_batches = tr.global_batch_size // (tr.micro_batch_size * dp)
    per_layer = layer_activation_bytes(recipe, device)
    stages = []
    for stage in range(par.pipeline):
        held, per_chunk = in_flight(recipe, stage, micro_batches)
        edges = 0
        if stage == 0:  # ids of each micro-batch in flight
            edges += input_edge_bytes(recipe, device) * min(par.pipeline, micro_batches)
        if stage == par.pipeline - 1:  # the loss is taken one micro-batch at a time
            edges += output_edge_bytes(recipe, vocab, device)
        state = state_bytes(recipe, stage, vocab, dp)
        edges += recompute_working_set(recipe, device)
        stages.append(
            StageMemory(
                stage=stage,
                parameters=state["parameters"],
                gradients=state["gradients"],
                optimizer=state["optimizer"],
                activations=per_layer * per_chunk * held + edges,
                activations_per_layer=per_layer,
                layers=per_chunk * held,
                in_flight=held,
            )
        )
    return stages
