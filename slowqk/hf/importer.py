"""Import a Hugging Face GPT-2 / LLaMA model into a megatron-core checkpoint at a chosen TP/PP
layout.

Each rank builds its part of the model from the recipe (with the architecture taken from the HF
``config.json``), fills every tensor it holds from the HF weights through megatron-core's own
sharding metadata (``sharded_state_dict``: the same slices a checkpoint load would use), and the
ranks save a weights-only checkpoint (``iter_0000000`` + ``latest``) with the tokenizer inside.
Continue pretraining from it with ``train.init_from=<out>``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from slowqk.checkpoint import save_checkpoint
from slowqk.config import Recipe, build_recipe
from slowqk.data.tokenizer import load_tokenizer
from slowqk.distributed import init_distributed
from slowqk.hf.mapping import GELU_FROM_HF, Rule, UnsupportedArchitecture, family, rules
from slowqk.models import build_gpt_model, build_transformer_config, padded_vocab_size


def model_overrides_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` recipe fields an HF ``config.json`` fixes (GPT-2, LLaMA or Qwen3), or a clear
    error."""
    kind = config.get("model_type")
    if kind == "gpt2":
        act = config.get("activation_function", "gelu_new")
        if act not in GELU_FROM_HF:
            raise UnsupportedArchitecture(
                f"config.json activation_function={act!r}: SlowQK's GPT-2 blocks have exact GELU "
                "('gelu') or its tanh approximation "
                f"({', '.join(k for k, v in GELU_FROM_HF.items() if v == 'tanh')})"
            )
        # fields that change the computation and that megatron-core's attention does not have
        for field, supported in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
        ):
            if field in config and bool(config[field]) != supported:
                raise UnsupportedArchitecture(
                    f"config.json {field}={config[field]!r}: only {supported} can be represented "
                    "(megatron-core scales attention logits by 1/sqrt(head_dim) in every layer)"
                )
        return {
            "num_layers": config["n_layer"],
            "hidden_size": config["n_embd"],
            "num_attention_heads": config["n_head"],
            "num_query_groups": None,
            "ffn_hidden_size": config.get("n_inner") or 4 * config["n_embd"],
            "seq_length": config["n_positions"],
            "ffn": "gelu",
            "gelu": GELU_FROM_HF[act],
            "norm": "layernorm",
            "position": "learned",
            "bias": True,
            "norm_epsilon": config.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": True,
            "vocab_size": config["vocab_size"],
        }
    if kind in ("llama", "qwen3"):
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        head_dim = config.get("head_dim") or hidden // heads
        if head_dim * heads != hidden:
            raise UnsupportedArchitecture(
                f"config.json head_dim={head_dim} x {heads} heads != hidden_size {hidden}"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(
                f"config.json hidden_act={config['hidden_act']!r}: expected 'silu'"
            )
        if kind == "qwen3" and config.get("use_sliding_window"):
            raise UnsupportedArchitecture(
                "config.json use_sliding_window=true: SlowQK attends to the whole context"
            )
        if kind == "qwen3" and config.get("attention_bias"):
            raise UnsupportedArchitecture(
                "config.json attention_bias=true: Qwen3 has no MLP biases and SlowQK has "
                "one model.bias for both"
            )
        if kind == "llama" and bool(config.get("attention_bias")) != bool(config.get("mlp_bias")):
            raise UnsupportedArchitecture(
                "config.json attention_bias and mlp_bias differ; SlowQK has one model.bias"
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": the older spelling
        if rope_type != "default":
            raise UnsupportedArchitecture(
                f"config.json rope type {rope_type!r}: only default RoPE is supported"
            )
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        kv = config.get("num_key_value_heads") or heads
        return {
            "num_layers": config["num_hidden_layers"],
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_query_groups": None if kv == heads else kv,
            "ffn_hidden_size": config["intermediate_size"],
            "seq_length": config.get(
                "max_position_embeddings", 2048
            ),  # RoPE: training may use a shorter one
            "ffn": "swiglu",
            "norm": "rmsnorm",
            "position": "rope",
            "bias": bool(config.get("attention_bias")),
            "qk_norm": kind == "qwen3",
            "norm_epsilon": config.get("rms_norm_eps", 1e-6),
            "rotary_base": float(theta),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
            "vocab_size": config["vocab_size"],
        }
    raise UnsupportedArchitecture(
        f"config.json model_type={kind!r}: SlowQK imports 'gpt2', 'llama' and 'qwen3'"
    )


def recipe_for(hf_dir: Path, recipe: Recipe, tensor: int, pipeline: int) -> Recipe:
    config = json.loads((hf_dir / "config.json").read_text())
    data = recipe.model_dump(mode="json")
    data["model"].update(model_overrides_from_hf(config))
    # no extra padding: zero rows would take part in the softmax and change the model's
    # probabilities
    data["model"]["make_vocab_size_divisible_by"] = 1
    data["parallel"].update(tensor=tensor, pipeline=pipeline)
    return build_recipe(data, f"{hf_dir}/config.json + recipe {recipe.name!r}")


class _HFWeights:
    """Lazy access to the tensors of an HF directory (single file or sharded with an index)."""

    def __init__(self, hf_dir: Path) -> None:
        # deferred: safetensors is an optional extra, imported only where used
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json"
            )
        self.files: dict[str, Any] = {}
        self.where: dict[str, str] = {}
        names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for name in names:
            try:
                f = safe_open(str(hf_dir / name), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise ValueError(
                    f"{hf_dir / name}: not a readable safetensors file ({exc})"
                ) from None
            self.files[name] = f
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                self.where[key] = name
        if weight_map:
            for key, name in weight_map.items():
                if self.where.get(key) != name:
                    raise ValueError(
                        f"{hf_dir}: index says {key!r} is in {name}, but that file does not hold it"
                    )

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ValueError(f"HF tensor {name!r} is missing")
        return self.files[self.where[name]].get_tensor(name)


def checkpoint_tensor(
    rule: Rule, weights: _HFWeights, num_layers: int, padded_vocab: int
) -> torch.Tensor:
    """The global (stacked, TP-merged) megatron tensor of ``rule`` built from HF weights."""
    if not rule.layered:
        t = rule.from_hf(*[weights.get(n) for n in rule.hf])
        if (
            rule.key in ("embedding.word_embeddings.weight", "output_layer.weight")
            and t.shape[0] < padded_vocab
        ):
            t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
        return t
    per_layer = [
        rule.from_hf(*[weights.get(n.format(i=i)) for n in rule.hf]) for i in range(num_layers)
    ]
    return torch.stack(per_layer)


def _sharded_tensors(obj) -> Iterator:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _sharded_tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _sharded_tensors(v)
    elif isinstance(obj, ShardedTensorFactory):  # e.g. SwiGLU fc1: views of [gate; up] halves
        yield from _sharded_tensors(obj.build())
    elif isinstance(obj, ShardedTensor):
        yield obj


@torch.no_grad()
def fill_model(model, recipe: Recipe, weights: _HFWeights, padded_vocab: int) -> int:
    """Copy HF weights into this rank's part of ``model``; returns the number of elements set."""
    by_key: dict[str, list] = {}
    for sh in _sharded_tensors(model.sharded_state_dict()):
        by_key.setdefault(sh.key, []).append(sh)
    filled = 0
    for rule in rules(recipe.model):
        if rule.key not in by_key:
            if (
                rule.key.endswith(".bias") and not recipe.model.bias
            ):  # GPT-2 biases vs a bias-free recipe
                glob = checkpoint_tensor(rule, weights, recipe.model.num_layers, padded_vocab)
                if glob.abs().max() > 0:
                    raise ValueError(
                        f"HF {rule.hf[0]} is non-zero but the recipe has model.bias=false"
                    )
            continue
        glob = checkpoint_tensor(rule, weights, recipe.model.num_layers, padded_vocab)
        for sh in by_key.pop(rule.key):
            part = glob[sh.global_slice()]
            if tuple(part.shape) != tuple(sh.data.shape):
                raise ValueError(
                    f"{rule.key}: HF weights give {tuple(part.shape)} for this rank, the model "
                    f"holds {tuple(sh.data.shape)}"
                )
            sh.data.copy_(part)
            filled += part.numel()
    left = [k for k in by_key if "_extra_state" not in k]
    if left:
        raise ValueError(f"model tensors with no HF source: {left}")
    return filled


def check_import(hf_dir: str | Path, recipe: Recipe, out: str | Path, overwrite: bool = False):
    """Everything an import can check before any rank starts: the destination, the architecture,
    the tokenizer, the weight files' headers and index, the vocabulary against the TP size.
    Returns ``(tokenizer file, tokenizer, weights, vocab_size)``."""
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    family(recipe.model)
    tok_path = hf_dir / "tokenizer.model"
    if not tok_path.is_file():
        tok_path = hf_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no tokenizer.model or tokenizer.json")
    tokenizer = load_tokenizer(tok_path)
    weights = _HFWeights(hf_dir)
    vocab = recipe.model.vocab_size or tokenizer.vocab_size
    padded = padded_vocab_size(
        vocab, recipe.model.make_vocab_size_divisible_by, recipe.parallel.tensor
    )
    if padded != vocab:
        raise ValueError(
            f"{hf_dir}: vocab_size {vocab} does not split over tensor parallel size "
            f"{recipe.parallel.tensor}; padding rows would change the model's probabilities "
            "(import at a TP size that divides it)"
        )
    return tok_path, tokenizer, weights, vocab


def import_rank(
    hf_dir: str | Path, recipe: Recipe, out: str | Path, overwrite: bool = False
) -> Path:
    """Run on every rank (world = TP x PP): build, fill and save. Returns the checkpoint directory.
    The checkpoint root is written beside ``out`` and put in its place at the end (``overwrite``
    replaces an existing one only then)."""
    hf_dir, out = Path(hf_dir), Path(out)
    tok_path, tokenizer, weights, vocab = check_import(hf_dir, recipe, out, overwrite)
    padded = vocab
    init_distributed(recipe.parallel, recipe.seed)
    tmp = out.with_name(out.name + ".import.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    cfg = build_transformer_config(
        recipe.model,
        tensor_parallel=recipe.parallel.tensor,
        pipeline_parallel=recipe.parallel.pipeline,
    )
    model = build_gpt_model(
        recipe.model,
        cfg,
        padded,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    fill_model(model, recipe, weights, padded)
    extra = {
        "recipe": recipe.model_dump(mode="json"),
        "tokenizer_sha256": tokenizer.sha256,
        "padded_vocab_size": padded,
        "vocab_size": vocab,
        "tokenizer_file": f"tokenizer/{tok_path.name}",
        "consumed_samples": 0,
        "skipped_total": 0,
        "imported_from": str(hf_dir),
    }
    path = save_checkpoint(
        tmp, 0, [model], None, None, extra, files={f"tokenizer/{tok_path.name}": tok_path}
    )
    if dist.get_rank() == 0:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
    return out / path.name
