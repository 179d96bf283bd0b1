"""Read documents from local corpora through Hugging Face ``datasets`` (streaming, offline).

Supported inputs: ``.jsonl``/``.json`` (one object per line), ``.txt`` (documents separated by blank
lines), ``.parquet``, and a directory written by ``Dataset.save_to_disk``. Documents are yielded in
a fixed order (inputs in the order given, rows in file order), which is what makes sharding
deterministic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Never reach a hub: every input is a local file.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class InputError(ValueError):
    """Bad input data; the message names the file and the problem."""


@dataclass
class ReadStats:
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")


def input_format(path: Path) -> str:
    if path.is_dir():
        return "hf-dir"
    suffix = "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".zst") else path.suffix
    formats = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
    if suffix not in formats:
        raise InputError(
            f"{path}: unsupported input type {suffix or '(none)'}; expected .jsonl, .json, .txt, "
            ".parquet or a saved dataset directory"
        )
    return formats[suffix]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: input not found")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: input file is empty")


def _first_bad_json_line(path: Path) -> str:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                return f"line {lineno}: not UTF-8 (byte {exc.start})"
            except json.JSONDecodeError as exc:
                return f"line {lineno}: invalid JSON ({exc.msg})"
    return "unreadable JSON"


def first_bad_utf8(path: Path) -> str:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"line {lineno}, byte offset {offset + exc.start}: not valid UTF-8"
            offset += len(raw)
    return "not valid UTF-8"


def _iter_jsonl_lenient(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Line by line, counting (not raising on) undecodable, invalid or field-less lines."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.skip("not UTF-8", where)
                continue
            except json.JSONDecodeError:
                stats.skip("invalid JSON", where)
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                stats.skip(f"no string field '{text_field}'", where)
                continue
            yield text


def _hf_stream(path: Path, fmt: str):
    # deferred: datasets is slow to import, and only this path needs it
    import datasets

    if fmt == "hf-dir":
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise InputError(
                    f"{path}: saved DatasetDict has splits {list(ds)}; expected 'train'"
                )
            ds = ds["train"]
        return ds.to_iterable_dataset()
    kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
    return datasets.load_dataset(
        fmt, data_files=[str(path)], split="train", streaming=True, **kwargs
    )


def iter_documents(
    path: str | Path,
    text_field: str = "text",
    *,
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Yield the text of every document in ``path``; bad input raises :class:`InputError`."""
    # deferred: datasets, pyarrow are slow to import, and only this path needs them
    import datasets
    import pyarrow

    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    _check_file(path)
    fmt = input_format(path)
    if fmt == "json" and skip_bad_lines:
        for text in _iter_jsonl_lenient(path, text_field, stats):
            stats.documents += 1
            yield text
        return
    if fmt == "text":
        text_field = "text"
    n = 0
    try:
        # batches of rows: far less per-document overhead than row dicts
        for batch in _hf_stream(path, fmt).iter(batch_size=4096):
            if text_field not in batch:
                raise InputError(
                    f"{path}: no field '{text_field}' (fields: {', '.join(sorted(batch))}); choose "
                    "one with --text-field"
                )
            for text in batch[text_field]:
                if not isinstance(text, str):
                    raise InputError(
                        f"{path}: field '{text_field}' of row {n + 1} is {type(text).__name__}, "
                        "expected a string"
                    )
                if fmt == "text":
                    text = text.strip("\n")
                    if not text.strip():
                        continue
                n += 1
                stats.documents += 1
                yield text
    except UnicodeDecodeError:
        raise InputError(f"{path}: {first_bad_utf8(path)}") from None
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowInvalid, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        if fmt == "json":
            raise InputError(
                f"{path}: {_first_bad_json_line(path)} (use --skip-bad-lines to skip such lines)"
            ) from None
        if "utf-8" in str(exc).lower() or "decode" in str(exc).lower():
            raise InputError(f"{path}: {first_bad_utf8(path)}") from None
        raise InputError(f"{path}: could not read ({type(exc).__name__}: {exc})") from None
    if n == 0:
        raise InputError(f"{path}: no documents")
