"""Tokenize corpora into sharded megatron-core indexed datasets, deterministically and resumably.

Layout of an output directory::

    build.json                 the inputs, options and tokenizer this directory is for
    tokenizer.model|.json      a copy of the tokenizer used
    train/shard_00000.{bin,idx}   + shard_00000.done.json while the build is incomplete
    valid/..., test/...
    manifest.json              written last: per-shard counts and sha256, tokenizer hash, inputs

Documents are numbered in input order; each goes to a split by a seeded hash of its number (or by
held-out files), and each split is cut into shards of ``docs_per_shard`` documents. Shard contents
therefore depend only on the inputs and options, never on the number of workers. ``workers``
tokenizer processes run while the main process reads the inputs (0: all in this process). A shard
is written under temporary names and renamed when complete; an interrupted build redoes only the
shards without a ``.done`` record. ``manifest.json`` exists only for a complete build.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from slowqk import faults
from slowqk.data.sources import InputError, ReadStats, iter_documents
from slowqk.data.tokenizer import load_tokenizer
from slowqk.hashing import file_sha256

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
BUILD = "build.json"


@dataclass(frozen=True)
class ShardOptions:
    text_field: str = "text"
    docs_per_shard: int = 100_000
    split: tuple[float, float, float] = (1.0, 0.0, 0.0)  # train, valid, test fractions
    valid_files: tuple[str, ...] = ()  # held-out inputs: every document goes to valid
    test_files: tuple[str, ...] = ()
    seed: int = 1234
    skip_bad_lines: bool = False

    def __post_init__(self) -> None:
        if self.docs_per_shard < 1:
            raise ValueError(f"docs_per_shard must be >= 1, got {self.docs_per_shard}")
        if (
            len(self.split) != 3
            or any(x < 0 for x in self.split)
            or abs(sum(self.split) - 1.0) > 1e-6
        ):
            raise ValueError(
                f"split must be three non-negative fractions summing to 1, got {self.split}"
            )


def parse_split(text: str) -> tuple[float, float, float]:
    """``"98,1,1"`` or ``"0.9,0.1"`` -> normalised (train, valid, test) fractions."""
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"split {text!r}: expected comma-separated numbers like 98,1,1") from None
    parts = (parts + [0.0, 0.0])[:3]
    total = sum(parts)
    if total <= 0 or any(p < 0 for p in parts):
        raise ValueError(f"split {text!r}: needs non-negative parts with a positive sum")
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def _mix64(x: int) -> int:
    """splitmix64: a fixed, platform-independent hash of a document number."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def assign_split(doc_index: int, seed: int, split: tuple[float, float, float]) -> str:
    u = _mix64(doc_index ^ (seed * 0x2545F4914F6CDD1D)) / 2.0**64
    if u < split[0]:
        return "train"
    return "valid" if u < split[0] + split[1] else "test"


# --------------------------------------------------------------------------- workers


def append_documents(builder, flat, lengths) -> None:
    """Append documents (one sequence each) to an ``IndexedDatasetBuilder`` in one write.

    Produces the same bytes as calling ``add_document(doc, [len(doc)])`` per document, which is
    what happens on megatron-core versions whose builder internals differ from 0.16's.
    """
    fast = (
        not getattr(builder, "multimodal", False)
        and isinstance(getattr(builder, "sequence_lengths", None), list)
        and isinstance(getattr(builder, "document_indices", None), list)
        and hasattr(builder, "data_file")
    )
    if not fast:
        start = 0
        for n in lengths:
            builder.add_document(flat[start : start + n], [int(n)])
            start += int(n)
        return
    builder.data_file.write(flat.astype(builder.dtype, copy=False).tobytes(order="C"))
    first = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(int(n) for n in lengths)
    builder.document_indices.extend(range(first + 1, first + 1 + len(lengths)))


_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _TOKENIZER = load_tokenizer(tokenizer_path)


def _write_shard(job: tuple[str, str, list[str]]) -> dict:
    """Tokenize one shard's documents (EOD appended) and write it; returns its manifest entry."""
    prefix, rel, texts = job
    tok = _TOKENIZER
    dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    tmp = f"{prefix}.tmp"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    docs = tok.tokenize_batch(texts)
    eod = tok.eod
    for ids in docs:
        ids.append(eod)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter(chain.from_iterable(docs), dtype=dtype, count=int(lengths.sum()))
    append_documents(builder, flat, lengths)
    builder.finalize(f"{tmp}.idx")
    n_tokens = int(lengths.sum())
    max_id = int(flat.max()) if flat.size else 0
    for ext in (".bin", ".idx"):
        with open(f"{tmp}{ext}", "rb+") as f:
            os.fsync(f.fileno())
        os.replace(f"{tmp}{ext}", f"{prefix}{ext}")
    entry = {
        "prefix": rel,
        "documents": len(texts),
        "tokens": n_tokens,
        "max_token_id": max_id,
        "sha256": {ext: file_sha256(f"{prefix}{ext}") for ext in (".bin", ".idx")},
    }
    _write_json(Path(f"{prefix}.done.json"), entry)
    return entry


# --------------------------------------------------------------------------- the build


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _build_record(inputs: Sequence[Path], tokenizer_sha256: str, options: ShardOptions) -> dict:
    record = {
        "inputs": [{"path": str(p.resolve()), "bytes": _size(p)} for p in inputs],
        "tokenizer_sha256": tokenizer_sha256,
        "options": asdict(options),
    }
    return json.loads(json.dumps(record))  # the form it has when read back (tuples -> lists)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _documents(
    inputs: Sequence[Path], options: ShardOptions, stats: ReadStats
) -> Iterator[tuple[str, str]]:
    """(split, text) for every document, in the fixed input order."""
    held_out = {str(Path(f).resolve()): "valid" for f in options.valid_files}
    held_out.update({str(Path(f).resolve()): "test" for f in options.test_files})
    index = 0
    for path in inputs:
        fixed = held_out.get(str(path.resolve()))
        for text in iter_documents(
            path, options.text_field, skip_bad_lines=options.skip_bad_lines, stats=stats
        ):
            yield (fixed or assign_split(index, options.seed, options.split)), text
            index += 1


def _jobs(
    out: Path, docs: Iterator[tuple[str, str]], per_shard: int
) -> Iterator[tuple[str, str, list[str]]]:
    buffers: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)

    def job(split: str) -> tuple[str, str, list[str]]:
        rel = f"{split}/shard_{counts[split]:05d}"
        counts[split] += 1
        texts, buffers[split] = buffers[split], []
        return str(out / rel), rel, texts

    for split, text in docs:
        buffers[split].append(text)
        if len(buffers[split]) == per_shard:
            yield job(split)
    for split in SPLITS:
        if buffers[split]:
            yield job(split)


def _fault_point(shards_done: int) -> None:
    """Fault injection for tests: SLOWQK_FAULT_KILL_AFTER_SHARDS=N kills the build (SIGKILL)."""
    limit = faults._env_int("SLOWQK_FAULT_KILL_AFTER_SHARDS")
    if limit is not None and shards_done >= limit:
        faults.kill_self()


def build_shards(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer_path: str | Path,
    options: ShardOptions = ShardOptions(),
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build (or finish, or reuse) a sharded dataset; returns the manifest."""
    if not inputs:
        raise InputError("no input files given")
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.exists():
            raise InputError(f"{p}: input not found")
    out = Path(out_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    record = _build_record(inputs, tokenizer.sha256, options)

    if out.exists() and any(out.iterdir()):
        existing = out / BUILD
        old = json.loads(existing.read_text()) if existing.is_file() else None
        if old != record:
            if not overwrite:
                what = "a different dataset" if old else "files that are not a SlowQK dataset"
                raise InputError(
                    f"{out}: output directory holds {what}; choose another --out or pass "
                    "--overwrite"
                )
            shutil.rmtree(out)
        elif (out / MANIFEST).is_file():
            return json.loads((out / MANIFEST).read_text())
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    _write_json(out / BUILD, record)
    tok_copy = out / (
        "tokenizer" + (".json" if Path(tokenizer_path).suffix == ".json" else ".model")
    )
    if not tok_copy.exists():
        shutil.copyfile(tokenizer_path, tok_copy)

    stats = ReadStats()
    entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
    bar = tqdm(desc="sharding", unit="doc", disable=not progress, mininterval=1.0)
    started, n_tokens, n_done = time.perf_counter(), 0, 0

    def record_entry(entry: dict) -> None:
        nonlocal n_tokens, n_done
        entries[entry["prefix"].split("/")[0]].append(entry)
        n_tokens += entry["tokens"]
        n_done += 1
        bar.update(entry["documents"])
        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - started, 1e-9):.0f}")
        _fault_point(n_done)

    def finished(job) -> dict | None:
        done = Path(f"{job[0]}.done.json")
        if done.is_file() and all(Path(f"{job[0]}{e}").is_file() for e in (".bin", ".idx")):
            entry = json.loads(done.read_text())
            if entry.get("documents") == len(job[2]):
                return entry
        return None

    jobs = _jobs(out, _documents(inputs, options, stats), options.docs_per_shard)
    if workers <= 0:  # in-process: no pipelining (debugging, or where processes are unwelcome)
        _init_worker(str(tokenizer_path))
        for job in jobs:
            record_entry(finished(job) or _write_shard(job))
    else:
        # fork (where available) starts workers without re-importing torch/megatron; the pool is
        # created before the input stream starts, so no reader threads exist yet
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
            pending: deque = deque()
            for job in jobs:
                done = finished(job)
                pending.append(done if done is not None else pool.apply_async(_write_shard, (job,)))
                while len(pending) > 2 * workers:  # bound the documents held in memory
                    head = pending.popleft()
                    record_entry(head if isinstance(head, dict) else head.get())
            while pending:
                head = pending.popleft()
                record_entry(head if isinstance(head, dict) else head.get())
    bar.close()

    splits = {}
    for split, items in entries.items():
        if not items:
            continue
        splits[split] = {
            "shards": items,
            "documents": sum(e["documents"] for e in items),
            "tokens": sum(e["tokens"] for e in items),
        }
    if not splits:
        raise InputError("inputs hold no documents")
    max_id = max(e["max_token_id"] for s in splits.values() for e in s["shards"])
    if max_id >= tokenizer.vocab_size:
        raise InputError(f"token id {max_id} >= tokenizer vocabulary size {tokenizer.vocab_size}")
    manifest = {
        **record,
        "format": "megatron-core indexed dataset",
        "tokenizer": {
            "file": tok_copy.name,
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
        },
        "splits": splits,
        "skipped": {
            "total": sum(stats.skipped.values()),
            "by_reason": stats.skipped,
            "examples": stats.examples,
        },
        "seconds": time.perf_counter() - started,
    }
    _write_json(out / MANIFEST, manifest)
    for done in out.glob("*/*.done.json"):
        done.unlink()
    for split in SPLITS:
        if split not in splits and (out / split).is_dir() and not any((out / split).iterdir()):
            (out / split).rmdir()
    return manifest


def load_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (not a dataset, or its build did not finish)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 (byte {exc.start}); damaged?") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise InputError(f"{path}: {problem}; damaged, or not a manifest this version wrote")
    return manifest


def _manifest_problem(manifest) -> str | None:
    """What a run needs from a manifest, checked for shape (values are checked against the
    files)."""
    if not isinstance(manifest, dict):
        return "expected a JSON object"
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or not all(
        isinstance(tok.get(k), str) for k in ("file", "sha256")
    ):
        return "'tokenizer' needs 'file' and 'sha256'"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "'splits' missing or empty"
    for name, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not shards:
            return f"split {name!r} lists no shards"
        for e in shards:
            if not (
                isinstance(e, dict)
                and isinstance(e.get("prefix"), str)
                and isinstance(e.get("sha256"), dict)
                and all(isinstance(e.get(k), int) and e[k] > 0 for k in ("documents", "tokens"))
            ):
                return f"split {name!r}: a shard entry lacks prefix, sha256, documents or tokens"
    return None


def check_tokenizer(tokenizer_path: str | Path, dataset_dir: str | Path, manifest: dict) -> None:
    """Refuse a tokenizer other than the one the dataset was made with."""
    got, want = file_sha256(tokenizer_path), manifest["tokenizer"]["sha256"]
    if got != want:
        raise InputError(
            f"tokenizer {tokenizer_path} (sha256 {got[:12]}) is not the tokenizer {dataset_dir} "
            f"was made with (sha256 {want[:12]})"
        )


def blend(
    dataset_dirs: Sequence[str | Path], weights: Sequence[float] | None, split: str
) -> tuple[list[str], list[float] | None]:
    """Shard prefixes and megatron-core blend weights for several datasets.

    A dataset's weight is spread over its shards in proportion to their tokens, so the blend
    samples datasets by the given weights and, within a dataset, shards by size.
    """
    if weights is not None and len(weights) != len(dataset_dirs):
        raise ValueError(f"{len(weights)} weights for {len(dataset_dirs)} datasets")
    prefixes: list[str] = []
    shard_weights: list[float] = []
    for i, root in enumerate(dataset_dirs):
        manifest = load_manifest(root)
        if split not in manifest["splits"]:
            raise InputError(f"{root}: no '{split}' split (has {', '.join(manifest['splits'])})")
        shards = manifest["splits"][split]["shards"]
        total = sum(e["tokens"] for e in shards)
        w = 1.0 if weights is None else float(weights[i])
        for e in shards:
            prefixes.append(str(Path(root) / e["prefix"]))
            shard_weights.append(w * e["tokens"] / total)
    if len(prefixes) == 1:
        return prefixes, None
    return prefixes, shard_weights
