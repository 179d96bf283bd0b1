"""Check a sharded dataset against its manifest, and show what is in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slowqk.data.shard import MANIFEST
from slowqk.data.tokenizer import file_sha256, load_tokenizer


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


def verify_dataset(dataset_dir: str | Path) -> dict:
    """Re-read every shard: hashes, counts, token ids < vocab, EOD at every document end."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

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
            missing = [f"{prefix}{e}" for e in (".bin", ".idx") if not Path(f"{prefix}{e}").is_file()]
            if missing:
                problems.append(f"missing shard files: {', '.join(missing)}")
                continue
            for ext, want in entry["sha256"].items():
                if file_sha256(f"{prefix}{ext}") != want:
                    problems.append(f"{prefix}{ext}: sha256 differs from the manifest")
            try:
                ds = IndexedDataset(str(prefix))
            except Exception as exc:  # a corrupt index raises assorted errors; report, don't crash
                problems.append(f"{prefix}: unreadable ({type(exc).__name__}: {exc})")
                continue
            n_docs = len(ds.document_indices) - 1
            lengths = ds.sequence_lengths
            if n_docs != entry["documents"]:
                problems.append(f"{prefix}: {n_docs} documents, manifest says {entry['documents']}")
            if int(lengths.sum()) != entry["tokens"]:
                problems.append(f"{prefix}: {int(lengths.sum())} tokens, manifest says {entry['tokens']}")
            data = np.asarray(ds.bin_reader.read(ds.index.dtype, int(lengths.sum()), 0)) if len(lengths) else np.array([])
            if data.size and int(data.max()) >= vocab:
                problems.append(f"{prefix}: token id {int(data.max())} >= vocabulary size {vocab}")
            ends = np.cumsum(lengths) - 1
            if len(ends) and not np.all(data[ends] == eod):
                bad = int(np.sum(data[ends] != eod))
                problems.append(f"{prefix}: {bad} documents do not end with EOD ({eod})")
            docs += n_docs
            tokens += int(lengths.sum())
        totals[split] = {"documents": docs, "tokens": tokens}
    if problems:
        raise VerifyError("dataset verification failed:\n  " + "\n  ".join(problems))
    return totals


def inspect_dataset(dataset_dir: str | Path, split: str = "train", n_docs: int = 3, max_chars: int = 400) -> str:
    """A few decoded documents and the split's statistics, as text."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

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
    out.append(f"=== {split}: {info['documents']} documents, {info['tokens']} tokens, {len(info['shards'])} shards")
    out.append(f"document length (tokens): mean {all_len.mean():.1f}, median {np.median(all_len):.0f}, "
               f"p99 {np.percentile(all_len, 99):.0f}, max {all_len.max()}")
    edges = np.unique(np.geomspace(1, max(2, all_len.max() + 1), num=10).astype(int))
    hist, _ = np.histogram(all_len, bins=edges)
    width = max(hist.max(), 1)
    for lo, hi, count in zip(edges[:-1], edges[1:], hist, strict=True):
        out.append(f"  [{lo:>6}, {hi:>6}) {count:>8} {'#' * int(40 * count / width)}")
    return "\n".join(out)
