"""In-training diagnostics: attention specialization, residual energy and Q/K update sizes.

Every ``diagnostics.interval`` steps the monitor runs one eval-mode forward on a fixed probe batch
(the first ``probe_samples`` validation samples: the training data order and RNG are untouched) and
records, per layer: attention entropy and max-probability (mean and per head), the RMS of the
residual stream entering the block and of the block's attention and FFN writes, and the relative
update ``||dW||/||W||`` of W_Q and W_K made by that step's optimizer update.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from slowqk.diagnostics import attention_entropy, attention_max_prob


def _rms(x) -> float:
    t = x[0] if isinstance(x, tuple) else x
    return float(t.detach().float().pow(2).mean().sqrt())


class Monitor:
    def __init__(self, trainer) -> None:
        from megatron.core import parallel_state

        from slowqk.data.loader import collate
        from slowqk.patches.qk_lr_scaling import find_qkv_params

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("diagnostics.interval > 0 is not supported with parallel.pipeline > 1 yet")
        self.trainer = trainer
        self.interval = trainer.recipe.diagnostics.interval
        self.model = trainer.chunks[0].module
        n = trainer.recipe.diagnostics.probe_samples
        self.batch = {k: v.to(trainer.device) for k, v in collate(trainer.valid_ds, list(range(n))).items()}
        all_layers = set(range(trainer.recipe.model.num_layers))
        self.qkv = [t for t in find_qkv_params([self.model], all_layers) if t.row_len > 1]  # weights only
        self._before: list[torch.Tensor] | None = None
        self.path = trainer.run_dir / "diagnostics.jsonl"
        self.enabled_io = trainer.rank == 0

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0

    # -- Q/K update size: snapshot before the optimizer step of a diagnostic step
    def before_update(self, step: int) -> None:
        self._before = [t.param.detach().float().clone() for t in self.qkv] if self.due(step) else None

    def _qk_updates(self) -> dict[int, dict[str, float]]:
        from megatron.core import parallel_state

        out: dict[int, dict[str, float]] = {}
        sums = []
        for t, w0 in zip(self.qkv, self._before, strict=True):
            new, old = t.param.detach().float().reshape(-1), w0.reshape(-1)
            for kind in ("q", "k"):
                blocks = t.layout.local_blocks(kind, row_len=t.row_len, tp_rank=t.tp_rank, tp_size=t.tp_size)
                sums.append(sum(float((b.view(new) - b.view(old)).pow(2).sum()) for b in blocks))
                sums.append(sum(float(b.view(old).pow(2).sum()) for b in blocks))
        totals = torch.tensor(sums, dtype=torch.float64, device=self.trainer.device)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:  # rows are split over TP ranks
            dist.all_reduce(totals, group=parallel_state.get_tensor_model_parallel_group())
        for i, t in enumerate(self.qkv):
            dq, nq, dk, nk = totals[4 * i : 4 * i + 4].tolist()
            out[t.layer] = {"q": (dq / nq) ** 0.5, "k": (dk / nk) ** 0.5}
        return out

    def after_update(self, step_done: int) -> dict | None:
        """Run after the optimizer step of step ``step_done - 1``; returns the record if due."""
        if self._before is None:
            return None
        updates = self._qk_updates()
        self._before = None
        layers = probe_stats(self.model, self.batch["tokens"], self.batch["position_ids"])
        for layer, u in updates.items():
            layers[layer]["dq_rel"], layers[layer]["dk_rel"] = u["q"], u["k"]
        record = {"step": step_done, "layers": {str(k): v for k, v in sorted(layers.items())}}
        if self.enabled_io:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tb = self.trainer.metrics._tb
            if tb is not None:
                for layer, v in layers.items():
                    for key in ("entropy", "max_prob", "residual_rms", "attn_write_rms", "ffn_write_rms", "dq_rel", "dk_rel"):
                        if key in v:
                            tb.add_scalar(f"diag/{key}/layer{layer:02d}", v[key], step_done)
        return record


@torch.no_grad()
def probe_stats(model, tokens: torch.Tensor, position_ids: torch.Tensor) -> dict[int, dict]:
    """Per-layer attention and residual statistics from one eval-mode forward (all TP ranks agree)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from slowqk.probe import attention_probs

    stats: dict[int, dict] = {}
    hooks = []

    def recorder(rec: dict, key: str):
        return lambda module, args, out: rec.__setitem__(key, _rms(out))

    for module in model.modules():
        if isinstance(module, TransformerLayer):
            rec = stats.setdefault(module.layer_number - 1, {})
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, rec=rec: rec.__setitem__(
                    "residual_rms", _rms(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])),
                with_kwargs=True))
            hooks.append(module.self_attention.register_forward_hook(recorder(rec, "attn_write_rms")))
            hooks.append(module.mlp.register_forward_hook(recorder(rec, "ffn_write_rms")))
    try:
        probs = attention_probs(model, tokens, position_ids)
    finally:
        for h in hooks:
            h.remove()
    for layer, p in probs.items():
        ent, mx = attention_entropy(p), attention_max_prob(p)
        stats[layer].update(entropy=float(ent.mean()), max_prob=float(mx.mean()),
                            entropy_per_head=[round(float(x), 6) for x in ent],
                            max_prob_per_head=[round(float(x), 6) for x in mx])
    return stats


def read_diagnostics(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
