"""Turn a plain-text corpus into a tokenizer and train/validation indexed datasets.

Documents are blocks of text separated by blank lines. The split is by position, fixed and
documented: the last ``valid_fraction`` of the corpus's lines are validation, the rest training,
so no document straddles the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slowqk.data.indexed import write_indexed_dataset, write_manifest
from slowqk.data.tokenizer import SentencePieceTokenizer, file_sha256, train_sentencepiece


@dataclass(frozen=True)
class PreparedCorpus:
    tokenizer_path: Path
    train_prefix: Path
    valid_prefix: Path
    manifest: dict


def split_documents(lines: list[str]) -> list[str]:
    docs, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.rstrip("\n"))
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def split_corpus(text: str, valid_fraction: float) -> tuple[list[str], list[str]]:
    lines = text.splitlines()
    cut = int(len(lines) * (1.0 - valid_fraction))
    return split_documents(lines[:cut]), split_documents(lines[cut:])


def prepare_corpus(
    corpus: str | Path,
    out_dir: str | Path,
    *,
    valid_fraction: float = 0.1,
    vocab_size: int = 2048,
    tokenizer: str | Path | None = None,
) -> PreparedCorpus:
    """Tokenize ``corpus`` into ``out_dir`` (reused when the manifest matches the inputs)."""
    corpus, out_dir = Path(corpus), Path(out_dir)
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    key = {
        "corpus": str(corpus.resolve()),
        "corpus_sha256": file_sha256(corpus),
        "valid_fraction": valid_fraction,
        "vocab_size": vocab_size,
        "tokenizer_source": str(tokenizer) if tokenizer else None,
    }
    tok_path = Path(tokenizer) if tokenizer else out_dir / "tokenizer.model"
    result = PreparedCorpus(tok_path, out_dir / "train", out_dir / "valid", {})
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("inputs") == key and all(
            Path(f"{p}{e}").is_file() for p in (result.train_prefix, result.valid_prefix) for e in (".bin", ".idx")
        ):
            return PreparedCorpus(tok_path, result.train_prefix, result.valid_prefix, manifest)

    text = corpus.read_text(encoding="utf-8")
    train_docs, valid_docs = split_corpus(text, valid_fraction)
    if not train_docs or not valid_docs:
        raise ValueError(
            f"{corpus}: split gave {len(train_docs)} training and {len(valid_docs)} validation "
            f"documents (valid_fraction={valid_fraction}); both must be non-empty"
        )
    if tokenizer is None:
        train_sentencepiece(train_docs, tok_path, vocab_size)
    tok = SentencePieceTokenizer(tok_path)
    manifest = {
        "inputs": key,
        "tokenizer": {"path": tok_path.name, "sha256": tok.sha256, "vocab_size": tok.vocab_size},
        "splits": {
            "train": write_indexed_dataset(train_docs, tok, result.train_prefix),
            "valid": write_indexed_dataset(valid_docs, tok, result.valid_prefix),
        },
    }
    write_manifest(manifest_path, manifest)
    return PreparedCorpus(tok_path, result.train_prefix, result.valid_prefix, manifest)
