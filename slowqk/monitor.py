"""In-training diagnostics: attention specialization, residual energy, Q/K update sizes, gradients.

Every ``diagnostics.interval`` steps the monitor runs one eval-mode forward on a fixed probe batch
(the first ``probe_samples`` validation samples: the training data order and RNG are untouched) and
records, per layer: attention entropy and max-probability (mean and per head), the RMS of the
residual stream entering the block and of the block's attention and FFN writes, the relative
update ``||dW||/||W||`` of W_Q and W_K made by that step's optimizer update, the gradient norm of
the layer's parameters for that step (the one the optimizer saw, before clipping), and the
estimators ``lambda_q``, ``lambda_k`` and ``pathway_energy`` (R_P / ||X||^2) defined in
:mod:`slowqk.diagnostics`.

Works under tensor, pipeline and data parallelism: each rank measures what it holds; sums are
all-reduced, per-layer statistics gathered over the pipeline; global rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import TransformerLayer

from slowqk.diagnostics import (
    attention_entropy,
    attention_max_prob,
    pathway_energy_ratio,
    qk_logit_change_sums,
)
from slowqk.lower_drift import layer_of_params
from slowqk.lr_groups import find_qkv_params
from slowqk.probe import attention_probs

log = logging.getLogger("slowqk.monitor")

SCALARS = (
    "entropy",
    "max_prob",
    "residual_rms",
    "attn_write_rms",
    "ffn_write_rms",
    "dq_rel",
    "dk_rel",
    "grad_norm",
    "lambda_q",
    "lambda_k",
    "pathway_energy",
)


def _rms(x) -> float:
    t = x[0] if isinstance(x, tuple) else x
    return float(t.detach().float().pow(2).mean().sqrt())


def _qkv_input(linear_qkv, x: torch.Tensor) -> torch.Tensor:
    """What ``linear_qkv``'s weight multiplies. Transformer Engine's fused LayerNorm-linear takes
    the
    un-normalized stream, so apply its norm here."""
    x = x.detach()
    weight = getattr(linear_qkv, "layer_norm_weight", None)
    if weight is None:
        return x
    eps = linear_qkv.config.layernorm_epsilon
    if linear_qkv.config.normalization == "RMSNorm":
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype) * weight
    return torch.nn.functional.layer_norm(
        x, x.shape[-1:], weight, getattr(linear_qkv, "layer_norm_bias", None), eps
    )


class Monitor:
    """The measurements; :class:`slowqk.callbacks.diagnostics.Diagnostics` calls it around the
    optimizer step and feeds the early warning from its records."""

    def __init__(
        self,
        interval: int,
        num_layers: int,
        engine,
        probe_batch: dict[str, torch.Tensor],
        device: torch.device,
        path: Path,
        write: bool,
        tensorboard=None,
        extra_steps: frozenset[int] = frozenset(),
    ) -> None:
        """``engine`` (:mod:`slowqk.engines`): the model chunks this rank holds (one, or one per
        virtual pipeline stage), their forward-only pass of the probe batch, the reduced
        gradients and (ZeRO-3) the gathered weights;
        ``write``: this rank writes ``path`` and ``tensorboard`` (a SummaryWriter or None)."""
        self.interval, self.num_layers = interval, num_layers
        self.extra_steps = extra_steps  # probed besides every interval-th step
        self.engine, self.device = engine, device
        chunks = [getattr(c, "module", c) for c in engine.chunks]
        # every chunk's layers in one module to walk (a view: nothing is copied or re-registered)
        self.model = chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)
        self.batch = probe_batch
        qkv = find_qkv_params([self.model], set(range(self.num_layers)))
        self.qkv_weights = {t.layer: t for t in qkv if t.row_len > 1}
        self.qkv_biases = {t.layer: t for t in qkv if t.row_len == 1}
        self.layer_of_param = layer_of_params([self.model])
        self._qkv_params = [t.param for t in qkv]
        self._before: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._grad_sq: torch.Tensor | None = None
        self.path, self.enabled_io, self.tb = path, write, tensorboard
        self._entropy_history: list[list[float]] = []
        self.seconds = 0.0  # time spent in the monitor (part of the training time)

    @contextlib.contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def due(self, step: int) -> bool:
        # ``step`` steps are done; the probe runs around the next one and is recorded as step + 1
        return step + 1 in self.extra_steps or (self.interval > 0 and step % self.interval == 0)

    # -- reductions over the model-parallel ranks that split a layer or hold other layers
    def _reduce_model_parallel(self, t: torch.Tensor) -> torch.Tensor:
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
        return t

    # -- before the optimizer step of a diagnostic step: snapshot Q/K, read the synced gradients
    def before_update(self, step: int) -> None:
        if not self.due(step):
            self._before = None
            return
        with self.engine.full_weights(self._qkv_params):
            bias = {i: t.param.detach().float().clone() for i, t in self.qkv_biases.items()}
            self._before = {
                layer: (t.param.detach().float().clone(), bias.get(layer))
                for layer, t in self.qkv_weights.items()
            }
        grad_sq = self.engine.layer_grad_sq(self.layer_of_param, self.num_layers)
        self._grad_sq = self._reduce_model_parallel(grad_sq)

    def _qk_updates(self) -> torch.Tensor:
        """Per layer ``[||dQ||^2, ||Q||^2, ||dK||^2, ||K||^2]`` over all TP/PP ranks."""
        sums = torch.zeros(self.num_layers, 4, dtype=torch.float64, device=self.device)
        for layer, t in self.qkv_weights.items():
            new, old = t.param.detach().float().reshape(-1), self._before[layer][0].reshape(-1)
            for j, kind in enumerate(("q", "k")):
                for b in t.layout.local_blocks(
                    kind, row_len=t.row_len, tp_rank=t.tp_rank, tp_size=t.tp_size
                ):
                    sums[layer, 2 * j] += (b.view(new) - b.view(old)).double().pow(2).sum()
                    sums[layer, 2 * j + 1] += b.view(old).double().pow(2).sum()
        return self._reduce_model_parallel(sums)

    def _logit_changes(self, qkv_inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per layer ``[||dQ K^T||^2, ||Q dK^T||^2, ||S||^2]`` over all TP/PP ranks."""
        sums = torch.zeros(self.num_layers, 3, dtype=torch.float64, device=self.device)
        for layer, t in self.qkv_weights.items():
            w0, b0 = self._before[layer]
            b1 = self.qkv_biases[layer].param.detach() if layer in self.qkv_biases else None
            sums[layer] = torch.tensor(
                qk_logit_change_sums(
                    qkv_inputs[layer],
                    w0,
                    t.param.detach(),
                    b0,
                    b1,
                    heads_per_group=t.layout.heads_per_group,
                    head_dim=t.layout.head_dim,
                ),
                dtype=torch.float64,
            )
        return self._reduce_model_parallel(sums)

    def after_update(self, step_done: int) -> dict | None:
        """Run after the optimizer step of step ``step_done - 1``; returns the record if due."""
        if self._before is None:
            return None
        with self.engine.full_weights(self._qkv_params):
            updates = self._qk_updates()
        qkv_inputs: dict[int, torch.Tensor] = {}
        layers = probe_stats(
            self.model,
            self.batch["tokens"],
            self.batch["position_ids"],
            forward=lambda: self.engine.probe_forward(self.batch),
            qkv_inputs=qkv_inputs,
        )
        with self.engine.full_weights(self._qkv_params):
            logits = self._logit_changes(qkv_inputs)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            parts: list[dict] = [{}] * ps.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(parts, layers, group=ps.get_pipeline_model_parallel_group())
            layers = {k: v for part in parts for k, v in part.items()}
        for layer, rec in layers.items():
            dq, nq, dk, nk = updates[layer].tolist()
            if nq > 0:
                rec["dq_rel"], rec["dk_rel"] = (dq / nq) ** 0.5, (dk / nk) ** 0.5
            lq, lk, s = logits[layer].tolist()
            if s > 0:
                rec["lambda_q"], rec["lambda_k"] = (lq / s) ** 0.5, (lk / s) ** 0.5
            rec["grad_norm"] = float(self._grad_sq[layer]) ** 0.5
        energy = pathway_energy_ratio(
            {k: v["ffn_write_rms"] for k, v in layers.items()},
            {k: v["residual_rms"] for k, v in layers.items()},
        )
        for layer, e in energy.items():
            layers[layer]["pathway_energy"] = e
        self._before = self._grad_sq = None
        record = {"step": step_done, "layers": {str(k): v for k, v in sorted(layers.items())}}
        return record

    def write(self, record: dict) -> None:
        """Append the record to diagnostics.jsonl and TensorBoard (the writing rank only)."""
        if self.enabled_io:
            self._write(record, {int(k): v for k, v in record["layers"].items()}, record["step"])

    def _write(self, record: dict, layers: dict[int, dict], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self.tb
        if tb is None:
            return
        for layer, v in layers.items():
            for key in SCALARS:
                if key in v:
                    tb.add_scalar(f"diag/{key}/layer{layer:02d}", v[key], step)
        # a layer x probe image of the entropy so far (bright = diffuse attention, dark = sharp)
        self._entropy_history.append([layers[i]["entropy"] for i in sorted(layers)])
        image = np.asarray(self._entropy_history, dtype=np.float32).T[None].clip(0.0, 1.0)
        tb.add_image("diag/entropy_layer_x_probe", image, step, dataformats="CHW")


@torch.no_grad()
def probe_stats(
    model,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    forward=None,
    qkv_inputs: dict[int, torch.Tensor] | None = None,
) -> dict[int, dict]:
    """Per-layer attention and residual statistics from one eval-mode forward, for the layers this
    rank holds (all TP ranks agree). ``forward``: see :func:`slowqk.probe.attention_probs`. When
    ``qkv_inputs`` is given it receives each layer's ``linear_qkv`` input."""
    stats: dict[int, dict] = {}
    hooks = []

    def recorder(rec: dict, key: str):
        return lambda module, args, out: rec.__setitem__(key, _rms(out))

    for module in model.modules():
        if isinstance(module, TransformerLayer):
            rec = stats.setdefault(module.layer_number - 1, {})
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args, kwargs, rec=rec: rec.__setitem__(
                        "residual_rms",
                        _rms(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]),
                    ),
                    with_kwargs=True,
                )
            )
            hooks.append(
                module.self_attention.register_forward_hook(recorder(rec, "attn_write_rms"))
            )
            hooks.append(module.mlp.register_forward_hook(recorder(rec, "ffn_write_rms")))
            if qkv_inputs is not None:
                hooks.append(
                    module.self_attention.linear_qkv.register_forward_pre_hook(
                        lambda m, args, layer=module.layer_number - 1: qkv_inputs.__setitem__(
                            layer, _qkv_input(m, args[0])
                        )
                    )
                )
    try:
        probs = attention_probs(model, tokens, position_ids, forward)
    finally:
        for h in hooks:
            h.remove()
    for layer, p in probs.items():
        ent, mx = attention_entropy(p), attention_max_prob(p)
        stats[layer].update(
            entropy=float(ent.mean()),
            max_prob=float(mx.mean()),
            entropy_per_head=[round(float(x), 6) for x in ent],
            max_prob_per_head=[round(float(x), 6) for x in mx],
        )
    return stats


def read_diagnostics(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
