"""Check a sharded dataset against its manifest, and show what is in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from slowqk.data.shard import MANIFEST
from slowqk.data.tokenizer import load_tokenizer
from slowqk.hashing import file_sha256, sha256_files


class VerifyError(ValueError):
    pass


def _load_manifest(dataset_dir: str | Path) -> tuple[Path, dict]:
    root = Path(dataset_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise VerifyError(f"{root}: no {MANIFEST} (not a dataset, or its build did not finish)")
    try:
        return root, json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VerifyError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def shard_problems(prefix: Path, entry: dict) -> tuple[list[str], object | None]:
    """The structural checks of one shard against its manifest entry, without reading the tokens:
    both files present, the index readable, documents and tokens as listed, the .bin exactly as
    long as the index says, record pointers consistent. Returns the problems and the open
    dataset."""
    missing = [f"{prefix}{e}" for e in (".bin", ".idx") if not Path(f"{prefix}{e}").is_file()]
    if missing:
        return [f"missing shard files: {', '.join(missing)}"], None
    try:
        ds = IndexedDataset(str(prefix))
    except Exception as exc:  # a damaged index raises assorted errors; report, don't crash
        return [f"{prefix}.idx: unreadable ({type(exc).__name__}: {exc})"], None
    problems = []
    lengths = ds.sequence_lengths.astype(np.int64)
    n_docs, tokens = len(ds.document_indices) - 1, int(lengths.sum())
    if n_docs != entry["documents"]:
        problems.append(f"{prefix}.idx: {n_docs} documents, the manifest says {entry['documents']}")
    if tokens != entry["tokens"]:
        problems.append(f"{prefix}.idx: {tokens} tokens, the manifest says {entry['tokens']}")
    itemsize = np.dtype(ds.index.dtype).itemsize
    size, want = Path(f"{prefix}.bin").stat().st_size, tokens * itemsize
    if size != want:
        problems.append(
            f"{prefix}.bin: {size} bytes, expected {want} ({tokens} tokens x {itemsize} bytes; "
            "truncated?)"
        )
    pointers = ds.index.sequence_pointers.astype(np.int64)
    if len(pointers) and (pointers[0] != 0 or np.any(np.diff(pointers) != lengths[:-1] * itemsize)):
        problems.append(
            f"{prefix}.idx: record offsets do not follow the record lengths (damaged index)"
        )
    return problems, (None if problems else ds)


def _shards(root: Path, manifest: dict) -> list[tuple[Path, dict]]:
    return [(root / e["prefix"], e) for info in manifest["splits"].values() for e in info["shards"]]


def check_dataset_on_open(dataset_dir: str | Path, manifest: dict, hashes: bool = True) -> None:
    """What a run checks when it opens a dataset, before any other data work: every shard's
    structure (:func:`shard_problems`) and, with ``hashes``, every shard file's sha256 against the
    manifest (split over torch.distributed ranks; every rank must call this). Raises VerifyError
    naming the first bad file."""
    root = Path(dataset_dir)
    for prefix, entry in _shards(root, manifest):
        problems, _ = shard_problems(prefix, entry)
        if problems:
            raise VerifyError(problems[0])
    if not hashes:
        return
    expected = {
        f"{prefix}{ext}": want
        for prefix, entry in _shards(root, manifest)
        for ext, want in entry["sha256"].items()
    }
    got = sha256_files(sorted(expected))
    bad = [path for path in sorted(expected) if got[path] != expected[path]]
    if bad:
        more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
        raise VerifyError(
            f"{bad[0]}: content differs from {root / MANIFEST} (sha256){more}; "
            "rebuild the dataset, or data.verify=false to skip this check"
        )


def verify_dataset(dataset_dir: str | Path) -> dict:
    """Re-read every shard: hashes, counts, token ids < vocab, EOD at every document end."""
    root, manifest = _load_manifest(dataset_dir)
    tok_file = root / manifest["tokenizer"]["file"]
    problems: list[str] = []
    if not tok_file.is_file():
        problems.append(f"{tok_file}: tokenizer copy missing")
    elif file_sha256(tok_file) != manifest["tokenizer"]["sha256"]:
        problems.append(f"{tok_file}: sha256 differs from the manifest's tokenizer_sha256")
    vocab, eod = manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eod"]
    totals = {}
    for split, info in manifest["splits"].items():
        docs = tokens = 0
        for entry in info["shards"]:
            prefix = root / entry["prefix"]
            if any(not Path(f"{prefix}{e}").is_file() for e in (".bin", ".idx")):
                problems += shard_problems(prefix, entry)[0]
                continue
            for ext, want in entry["sha256"].items():
                if file_sha256(f"{prefix}{ext}") != want:
                    problems.append(f"{prefix}{ext}: sha256 differs from the manifest")
            found, ds = shard_problems(prefix, entry)
            problems += found
            if ds is None:
                continue
            lengths = ds.sequence_lengths
            data = (
                np.asarray(ds.bin_reader.read(ds.index.dtype, int(lengths.sum()), 0))
                if len(lengths)
                else np.array([])
            )
            if data.size and int(data.max()) >= vocab:
                problems.append(f"{prefix}: token id {int(data.max())} >= vocabulary size {vocab}")
            ends = np.cumsum(lengths) - 1
            if len(ends) and not np.all(data[ends] == eod):
                bad = int(np.sum(data[ends] != eod))
                problems.append(f"{prefix}: {bad} documents do not end with EOD ({eod})")
            docs += len(ds.document_indices) - 1
            tokens += int(lengths.sum())
        totals[split] = {"documents": docs, "tokens": tokens}
    if problems:
        raise VerifyError("dataset verification failed:\n  " + "\n  ".join(problems))
    return totals


def inspect_dataset(
    dataset_dir: str | Path, split: str = "train", n_docs: int = 3, max_chars: int = 400
) -> str:
    """A few decoded documents and the split's statistics, as text."""
    root, manifest = _load_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise VerifyError(f"{root}: no '{split}' split (has {', '.join(manifest['splits'])})")
    tok = load_tokenizer(root / manifest["tokenizer"]["file"])
    lengths = []
    out = []
    shown = 0
    for entry in manifest["splits"][split]["shards"]:
        ds = IndexedDataset(str(root / entry["prefix"]))
        lengths.append(ds.sequence_lengths.astype(np.int64))
        for i in range(min(n_docs - shown, len(ds))):
            text = tok.detokenize(ds[i][:-1])  # without the EOD
            out.append(f"--- doc {shown} ({len(ds[i])} tokens, {entry['prefix']}) ---")
            out.append(text[:max_chars] + ("..." if len(text) > max_chars else ""))
            shown += 1
    all_len = np.concatenate(lengths) if lengths else np.array([0])
    info = manifest["splits"][split]
    out.append(
        f"=== {split}: {info['documents']} documents, {info['tokens']} tokens, "
        f"{len(info['shards'])} shards"
    )
    out.append(
        f"document length (tokens): mean {all_len.mean():.1f}, median {np.median(all_len):.0f}, "
        f"p99 {np.percentile(all_len, 99):.0f}, max {all_len.max()}"
    )
    edges = np.unique(np.geomspace(1, max(2, all_len.max() + 1), num=10).astype(int))
    hist, _ = np.histogram(all_len, bins=edges)
    width = max(hist.max(), 1)
    for lo, hi, count in zip(edges[:-1], edges[1:], hist, strict=True):
        out.append(f"  [{lo:>6}, {hi:>6}) {count:>8} {'#' * int(40 * count / width)}")
    return "\n".join(out)
