"""Export a SlowQK (megatron-core) checkpoint of any TP/PP layout to a Hugging Face model directory.

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards with
``model.safetensors.index.json``) and the tokenizer, into a temporary directory that is renamed
into place only when complete. Tensors are streamed: one stacked checkpoint tensor and one output
shard in memory at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from slowqk.checkpoint import megatron_checkpoint
from slowqk.config import ModelConfig, Recipe
from slowqk.data.tokenizer import load_tokenizer
from slowqk.hf.mapping import expected_shape, hf_config, iter_hf_tensors, rules
from slowqk.hf.reader import CheckpointReader, CheckpointReadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


class _ShardWriter:
    """Accumulates tensors and writes safetensors shards of at most ``max_bytes`` each."""

    def __init__(self, out: Path, max_bytes: int, metadata: dict[str, str]) -> None:
        self.out, self.max_bytes, self.metadata = out, max_bytes, metadata
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        # deferred: safetensors is an optional extra, imported only where used
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(
            self.pending, str(self.out / f"shard-{len(self.files):05d}.tmp"), metadata=self.metadata
        )
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.files)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        umask = os.umask(0)
        os.umask(umask)
        for i, name in enumerate(names):
            # safetensors creates files 0600; give them the mode every other file here gets
            os.chmod(self.out / f"shard-{i:05d}.tmp", 0o666 & ~umask)
            os.replace(self.out / f"shard-{i:05d}.tmp", self.out / name)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t: names[i] for i, ts in enumerate(self.files) for t in ts},
            }
            (self.out / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True)
            )
        return names


def _zero_bias_for(rule_key: str, reader: CheckpointReader) -> torch.Tensor:
    """Megatron without biases = GPT-2 with zero biases: the shape from the matching weight."""
    weight = reader.shape(rule_key.replace(".bias", ".weight"))
    return torch.zeros(weight[0], weight[1])  # [layers, out features]


def write_tokenizer(src: Path, out: Path) -> None:
    """Hugging Face tokenizer files for ``src`` (a SentencePiece model or a tokenizer.json).

    A SentencePiece model is converted by ``transformers``' own LLaMA converter with no BOS/EOS
    added (SlowQK trains without them); ids equal SentencePiece's for text that does not start
    with whitespace (a leading run of spaces may split differently).
    """
    # deferred: transformers is an optional extra, imported only where used
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if src.suffix == ".json":
        tok = PreTrainedTokenizerFast(tokenizer_file=str(src))
    else:
        staging = out / ".tokenizer-src"
        staging.mkdir()
        shutil.copyfile(src, staging / "tokenizer.model")
        (staging / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "add_bos_token": False,
                    "add_eos_token": False,
                    "legacy": False,
                }
            )
        )
        tok = AutoTokenizer.from_pretrained(str(staging))
        shutil.rmtree(staging)
        shutil.copyfile(src, out / "tokenizer.model")
    tok.model_max_length = 1 << 30
    tok.save_pretrained(str(out))


def _special_id(tokenizer, name: str) -> int | None:
    try:
        value = getattr(tokenizer, name)
    except (AttributeError, NotImplementedError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
) -> Path:
    """Export ``checkpoint`` to ``out_dir``; returns ``out_dir``. Raises a one-line error naming
    the problem (unsupported architecture, missing or corrupt files, wrong recipe)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    reader = CheckpointReader(megatron_checkpoint(checkpoint, "export-hf"))
    extra = reader.extra
    recipe = Recipe.model_validate(extra["recipe"])
    model: ModelConfig = recipe.model
    key_rules = rules(model)  # raises UnsupportedArchitecture naming the part
    vocab = int(extra.get("vocab_size") or model.vocab_size or 0)
    if not vocab:
        raise CheckpointReadError(
            f"{reader.path}: the checkpoint does not record its vocabulary size"
        )
    tok_file = reader.path / extra.get("tokenizer_file", "")
    if not extra.get("tokenizer_file") or not tok_file.is_file():
        raise CheckpointReadError(f"{reader.path}: no tokenizer file in the checkpoint")

    tokenizer = load_tokenizer(tok_file)
    if tokenizer.sha256 != extra.get("tokenizer_sha256"):
        raise CheckpointReadError(
            f"{tok_file}: sha256 differs from the checkpoint's tokenizer_sha256"
        )
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eod")

    # The checkpoint's tensors must be exactly what its recipe describes (before anything is
    # written).
    padded = int(
        extra.get("padded_vocab_size") or reader.shape("embedding.word_embeddings.weight")[0]
    )
    expected = {r.key for r in key_rules}
    for key in reader.tensor_keys():
        if not key.startswith(("embedding.", "decoder.", "output_layer.")) or "_extra_state" in key:
            continue
        if key not in expected:
            raise CheckpointReadError(
                f"{reader.path}: tensor {key!r} has no place in the "
                f"{type(hf_config(model, padded, bos, eos)).__name__} layout of the checkpoint's "
                "recipe"
            )
        want = expected_shape(key, model, padded)
        if reader.shape(key) != want:
            raise CheckpointReadError(
                f"{reader.path}: tensor {key!r} has shape {reader.shape(key)}, the checkpoint's "
                f"recipe implies {want} (a checkpoint from a different recipe?)"
            )
    if vocab > padded:
        raise CheckpointReadError(
            f"{reader.path}: vocab_size {vocab} exceeds the embedding's {padded} rows"
        )

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        target = DTYPES[dtype]
        writer = _ShardWriter(tmp, _parse_size(max_shard_size), {"format": "pt"})
        for rule in key_rules:
            if reader.has(rule.key):
                stacked = reader.load(rule.key)
            elif rule.key.endswith(".bias") and not model.bias:
                stacked = _zero_bias_for(rule.key, reader)
            else:
                raise CheckpointReadError(
                    f"{reader.path}: tensor {rule.key!r} is missing from the checkpoint"
                )
            for name, tensor in iter_hf_tensors(rule, stacked):
                writer.add(name, tensor.to(target).contiguous())
            del stacked
        writer.finish()
        config = hf_config(model, padded, bos, eos)  # padded rows kept: see slowqk.hf.mapping
        config.dtype = dtype
        config.save_pretrained(str(tmp))
        # deferred: transformers is an optional extra, imported only where used
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(
            str(tmp)
        )
        write_tokenizer(tok_file, tmp)
        (tmp / "slowqk_export.json").write_text(
            json.dumps(
                {
                    "checkpoint": str(reader.path),
                    "step": extra.get("step"),
                    "recipe": extra["recipe"],
                    "tokenizer_sha256": extra.get("tokenizer_sha256"),
                    "dtype": dtype,
                },
                indent=2,
            )
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
