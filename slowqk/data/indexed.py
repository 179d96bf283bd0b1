"""Write megatron-core indexed datasets (``.bin``/``.idx``) atomically, with a manifest."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from slowqk.data.tokenizer import SentencePieceTokenizer, file_sha256


def write_indexed_dataset(
    documents: Iterable[str], tokenizer: SentencePieceTokenizer, prefix: str | Path
) -> dict:
    """Tokenize ``documents`` (EOD appended to each) into ``prefix.bin/.idx``.

    Files are written under temporary names and renamed into place only when complete, so a
    crash never leaves a dataset that looks whole. Returns the manifest entry.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + ".tmp")
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    n_docs = n_tokens = 0
    for text in documents:
        ids = tokenizer.tokenize(text).tolist() + [tokenizer.eod]
        builder.add_document(ids, [len(ids)])
        n_docs += 1
        n_tokens += len(ids)
    if n_docs == 0:
        raise ValueError(f"no documents to write for {prefix}")
    builder.finalize(f"{tmp}.idx")
    for ext in (".bin", ".idx"):
        with open(f"{tmp}{ext}", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(f"{tmp}{ext}", f"{prefix}{ext}")
    return {
        "prefix": prefix.name,
        "documents": n_docs,
        "tokens": n_tokens,
        "sha256": {ext: file_sha256(f"{prefix}{ext}") for ext in (".bin", ".idx")},
        "tokenizer_sha256": tokenizer.sha256,
    }


def write_manifest(path: str | Path, manifest: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(path)
