"""SentencePiece tokenizers: training from text, and the megatron-core tokenizer interface."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer

from slowqk.hashing import file_sha256

try:  # megatron-core 0.14 - 0.16: the datasets' tokenizer base class
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer as _TokenizerBase
except ImportError:  # megatron-core >= 0.19 removed it; its datasets only read .eod and .vocab_size

    class _TokenizerBase:  # type: ignore[no-redef]
        def __init__(self, name: str, **kwargs) -> None:
            self.unique_identifiers = {
                "class": type(self).__name__,
                "tokenizer_path": [name],
                **kwargs,
            }


def train_sentencepiece(
    texts: Iterable[str],
    out_path: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    special_tokens: list[str] | None = None,
) -> Path:
    """Train a SentencePiece model on ``texts`` and write it atomically to ``out_path``."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer model type {model_type!r}: expected 'bpe' or 'unigram'")
    out_path = Path(out_path)
    model = io.BytesIO()
    try:
        _train(texts, model, vocab_size, model_type, special_tokens)
    except RuntimeError as exc:  # sentencepiece reports bad settings as RuntimeError
        raise ValueError(
            f"tokenizer training failed (vocab_size={vocab_size}): {str(exc).split('] ')[-1]}"
        ) from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)
    return out_path


def _train(
    texts, model, vocab_size: int, model_type: str, special_tokens: list[str] | None
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,  # any byte sequence stays representable
        # keep the text as it is: newlines and runs of spaces carry layout (verse, code)
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n", *(special_tokens or [])],
        split_by_whitespace=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,  # thread count changes the learned vocabulary; keep it reproducible
        minloglevel=2,
    )


class SentencePieceTokenizer(_TokenizerBase):
    """A SentencePiece model behind megatron-core's dataset tokenizer interface."""

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.sha256 = file_sha256(path)
        super().__init__(str(path), sha256=self.sha256)
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.path = path

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), dtype=np.int32)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        # one call into C++ for the batch; single-threaded so a worker uses one core
        return self.sp.encode(texts, num_threads=1)

    def detokenize(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self.sp.eos_id()

    @property
    def pad(self) -> int:
        return self.sp.pad_id()

    @property
    def bos(self) -> int:
        return self.sp.bos_id()


class HFTokenizer(_TokenizerBase):
    """A Hugging Face ``tokenizer.json`` (``tokenizers`` library) behind the same interface."""

    def __init__(self, path: str | Path, eod_token: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.sha256 = file_sha256(path)
        super().__init__(str(path), sha256=self.sha256)
        self.tok = Tokenizer.from_file(str(path))
        self.path = path
        candidates = (
            [eod_token] if eod_token else ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
        )
        ids = [self.tok.token_to_id(t) for t in candidates if t]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ValueError(
                f"{path}: no end-of-document token among {candidates}; pass one explicitly"
            )
        self._eod = ids[0]

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self.tok.get_vocab()

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.tok.get_vocab().items()}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def eod(self) -> int:
        return self._eod


def load_tokenizer(path: str | Path):
    """A SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.suffix == ".json":
        return HFTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a SentencePiece model ({exc})") from None
