"""Turn one plain-text corpus into a tokenizer and train/validation shards (the quickstart's data).

Documents are blocks of text separated by blank lines. The split is by position, fixed and
documented: the last ``valid_fraction`` of the corpus's lines are validation, the rest training,
so no document straddles the two. Tokenization and sharding go through :mod:`slowqk.data.shard`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slowqk.data.shard import ShardOptions, build_shards
from slowqk.data.sources import InputError, first_bad_utf8
from slowqk.data.tokenizer import train_sentencepiece

DATASET_DIR = "dataset"  # the shards' folder inside a preparation


@dataclass(frozen=True)
class PreparedCorpus:
    dataset_dir: Path
    tokenizer_path: Path
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


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # keep the mtime-free build record stable
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_corpus(corpus: Path) -> str:
    """The corpus's text; a missing or non-UTF-8 file refused in one line."""
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus file not found: {corpus}")
    try:
        return corpus.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"{corpus}: {first_bad_utf8(corpus)}; expected a UTF-8 text file"
        ) from None


def prepare_corpus(
    corpus: str | Path,
    out_dir: str | Path,
    *,
    valid_fraction: float = 0.1,
    vocab_size: int = 2048,
    tokenizer: str | Path | None = None,
    progress: bool = False,
) -> PreparedCorpus:
    """Split, train a tokenizer (unless given) and shard ``corpus`` into ``out_dir``.

    Reuses what is there when inputs and options are unchanged.
    """
    corpus, out_dir = Path(corpus), Path(out_dir)
    text = read_corpus(corpus)  # read (and refuse) the corpus before anything is written
    train_docs, valid_docs = split_corpus(text, valid_fraction)
    if not train_docs or not valid_docs:
        raise ValueError(
            f"{corpus}: split gave {len(train_docs)} training and {len(valid_docs)} validation "
            f"documents (valid_fraction={valid_fraction}); both must be non-empty"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    train_txt, valid_txt = out_dir / "corpus_train.txt", out_dir / "corpus_valid.txt"
    _write_if_changed(train_txt, "\n\n".join(train_docs) + "\n")
    _write_if_changed(valid_txt, "\n\n".join(valid_docs) + "\n")
    if tokenizer is None:
        tok_path = out_dir / f"tokenizer_v{vocab_size}.model"
        if not tok_path.is_file():
            train_sentencepiece(train_docs, tok_path, vocab_size)
    else:
        tok_path = Path(tokenizer)
    dataset_dir = out_dir / DATASET_DIR
    manifest = build_shards(
        [train_txt, valid_txt],
        dataset_dir,
        tok_path,
        ShardOptions(valid_files=(str(valid_txt),), docs_per_shard=100_000),
        progress=progress,
        overwrite=True,
    )
    return PreparedCorpus(dataset_dir, dataset_dir / manifest["tokenizer"]["file"], manifest)
