"""Benchmark the sharding tool against a plain single-process loop (prints tokens/s).

Builds a corpus of at least --mb megabytes by repeating tiny Shakespeare (documents separated by
blank lines), trains one tokenizer, then measures, side by side on the same machine:

- plain: read the text, split documents, ``sp.encode`` one by one, ``IndexedDatasetBuilder``
- tool at 1 and at 2 workers (``slowqk data shard``'s code path)

    python tools/bench_sharding.py [--mb 50] [--corpus ../shared/data/tinyshakespeare/input.txt]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_corpus(src: Path, dst: Path, megabytes: int) -> int:
    text = src.read_text(encoding="utf-8").strip("\n") + "\n\n"
    reps = max(1, int(megabytes * 1e6 / len(text.encode())) + 1)
    with open(dst, "w", encoding="utf-8") as f:
        for _ in range(reps):
            f.write(text)
    return dst.stat().st_size


def plain_loop(corpus: Path, tokenizer_path: Path, out_prefix: Path) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from slowqk.data.corpus import split_documents
    from slowqk.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    builder = IndexedDatasetBuilder(f"{out_prefix}.bin", dtype=np.uint16)
    n = 0
    with open(corpus, encoding="utf-8") as f:
        for doc in split_documents(f.read().splitlines()):
            ids = tok.tokenize(doc).tolist() + [tok.eod]
            builder.add_document(ids, [len(ids)])
            n += len(ids)
    builder.finalize(f"{out_prefix}.idx")
    return n


def main() -> None:
    from slowqk.data.shard import ShardOptions, build_shards
    from slowqk.data.tokenizer import train_sentencepiece

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument(
        "--corpus",
        default=str(
            Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare/input.txt"
        ),
    )
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--docs-per-shard", type=int, default=20_000)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="slowqk-bench-"))
    try:
        corpus = work / "corpus.txt"
        size = make_corpus(Path(args.corpus), corpus, args.mb)
        src_docs = Path(args.corpus).read_text(encoding="utf-8").split("\n\n")
        tok = train_sentencepiece(src_docs, work / "tok.model", args.vocab_size)
        rows = []
        t = time.perf_counter()
        tokens = plain_loop(corpus, tok, work / "plain")
        rows.append(("plain loop (1 process)", 1, tokens, time.perf_counter() - t))
        for workers in (1, 2):
            t = time.perf_counter()
            m = build_shards(
                [corpus],
                work / f"tool{workers}",
                tok,
                ShardOptions(docs_per_shard=args.docs_per_shard),
                workers=workers,
                progress=False,
            )
            rows.append(
                (
                    f"slowqk data shard, {workers} worker(s)",
                    workers,
                    m["splits"]["train"]["tokens"],
                    time.perf_counter() - t,
                )
            )
        base = rows[0][2] / rows[0][3]
        print(f"corpus: {size / 1e6:.1f} MB, {rows[0][2]:,} tokens (vocab {args.vocab_size})")
        print(f"{'method':<34}{'tokens/s':>12}{'per worker':>12}{'vs plain':>10}{'seconds':>9}")
        for name, workers, n, sec in rows:
            rate = n / sec
            print(
                f"{name:<34}{rate:>12,.0f}{rate / workers:>12,.0f}{rate / base:>9.2f}x{sec:>9.1f}"
            )
        same = (work / "plain.bin").read_bytes() == b"".join(
            (work / "tool1" / "train" / f"shard_{i:05d}.bin").read_bytes()
            for i in range(len(list((work / "tool1" / "train").glob("*.bin"))))
        )
        print(f"tool output tokens identical to the plain loop's: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
