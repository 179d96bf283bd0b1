"""Data tools: tokenizers, sharding (round trip, determinism, resume), verification, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED

from slowqk.cli import main
from slowqk.data.corpus import split_documents
from slowqk.data.shard import (
    ShardOptions,
    assign_split,
    blend,
    build_shards,
    check_tokenizer,
    parse_split,
)
from slowqk.data.sources import InputError
from slowqk.data.tokenizer import load_tokenizer, train_sentencepiece
from slowqk.data.verify import VerifyError, inspect_dataset, verify_dataset

CORPUS = SHARED / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return split_documents(CORPUS.read_text().splitlines()[:6000])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, docs) -> Path:
    return train_sentencepiece(docs, tmp_path_factory.mktemp("tok") / "tok.model", 512)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("in") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    return path


def _decoded(root: Path, split: str) -> list[str]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    manifest = json.loads((root / "manifest.json").read_text())
    tok = load_tokenizer(root / manifest["tokenizer"]["file"])
    out = []
    for entry in manifest["splits"][split]["shards"]:
        ds = IndexedDataset(str(root / entry["prefix"]))
        out += [tok.detokenize(ds[i][:-1]) for i in range(len(ds))]
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "build.json")
    }


def test_round_trip_text_to_shards_to_text(tmp_path, jsonl, tokenizer, docs) -> None:
    manifest = build_shards(
        [jsonl],
        tmp_path / "ds",
        tokenizer,
        ShardOptions(docs_per_shard=300, split=(0.8, 0.1, 0.1)),
        progress=False,
    )
    want = {
        s: [d for i, d in enumerate(docs) if assign_split(i, 1234, (0.8, 0.1, 0.1)) == s]
        for s in ("train", "valid", "test")
    }
    for split in ("train", "valid", "test"):
        assert _decoded(tmp_path / "ds", split) == want[split]
        assert manifest["splits"][split]["documents"] == len(want[split])
    assert len(manifest["splits"]["train"]["shards"]) == -(-len(want["train"]) // 300)
    assert manifest["inputs"][0]["bytes"] == jsonl.stat().st_size
    verify_dataset(tmp_path / "ds")
    report = inspect_dataset(tmp_path / "ds", "valid", 2)
    assert "--- doc 1" in report and "document length" in report


def test_byte_identical_across_worker_counts(tmp_path, jsonl, tokenizer) -> None:
    opts = ShardOptions(docs_per_shard=150, split=(0.9, 0.1, 0.0))
    m1 = build_shards([jsonl], tmp_path / "w1", tokenizer, opts, workers=1, progress=False)
    m2 = build_shards([jsonl], tmp_path / "w2", tokenizer, opts, workers=2, progress=False)
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")
    assert m1["splits"] == m2["splits"]
    assert len(m1["splits"]["train"]["shards"]) > 4


def test_resume_after_killed_run(tmp_path, jsonl, tokenizer) -> None:
    args = [
        sys.executable,
        "-m",
        "slowqk.cli",
        "data",
        "shard",
        str(jsonl),
        "--out",
        str(tmp_path / "ds"),
        "--tokenizer",
        str(tokenizer),
        "--docs-per-shard",
        "200",
        "--quiet",
    ]
    env = dict(os.environ, SLOWQK_FAULT_KILL_AFTER_SHARDS="3")
    killed = subprocess.run(args, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "ds" / "manifest.json").exists()  # nothing claims to be complete
    done = sorted((tmp_path / "ds" / "train").glob("*.done.json"))
    total = -(-json.loads(jsonl.read_text().splitlines()[-1])["id"] // 200)
    assert 3 <= len(done) < total  # a worker may finish one more shard before the kill lands
    with pytest.raises(VerifyError, match="no manifest.json"):
        verify_dataset(tmp_path / "ds")
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    fresh = build_shards(
        [jsonl], tmp_path / "fresh", tokenizer, ShardOptions(docs_per_shard=200), progress=False
    )
    assert _files(tmp_path / "ds") == _files(tmp_path / "fresh")
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["splits"] == fresh["splits"]
    verify_dataset(tmp_path / "ds")


def test_verify_catches_corruption(tmp_path, jsonl, tokenizer) -> None:
    build_shards(
        [jsonl], tmp_path / "ds", tokenizer, ShardOptions(docs_per_shard=300), progress=False
    )
    shard = tmp_path / "ds" / "train" / "shard_00001.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="shard_00001.bin: sha256 differs"):
        verify_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "train" / "shard_00002.idx").unlink()
    with pytest.raises(VerifyError, match="missing shard files"):
        verify_dataset(tmp_path / "ds")


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.jsonl", b"", "input file is empty"),
        ("bad.jsonl", b'{"text": "a"}\n{not json\n', "line 2: invalid JSON"),
        ("nofield.jsonl", b'{"body": "a"}\n', "no field 'text' \\(fields: body\\)"),
        ("latin1.txt", b"caf\xe9 ol\xe9\n\nmore\n", "line 1, byte offset 3: not valid UTF-8"),
        ("blank.txt", b"\n\n\n", "no documents"),
        ("data.csv", b"a,b\n", "unsupported input type .csv"),
    ],
)
def test_bad_inputs_give_clear_errors(tmp_path, tokenizer, name, content, match, capsys) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        build_shards([path], tmp_path / "out", tokenizer, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    code = main(
        [
            "data",
            "shard",
            str(path),
            "--out",
            str(tmp_path / "out2"),
            "--tokenizer",
            str(tokenizer),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "Traceback" not in err


def test_bad_lines_are_counted_and_skipped_under_flag(tmp_path, tokenizer) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "one"}\n{oops\n{"text": 3}\n\xff\xfe\n{"text": "two"}\n')
    manifest = build_shards(
        [path], tmp_path / "ds", tokenizer, ShardOptions(skip_bad_lines=True), progress=False
    )
    assert manifest["splits"]["train"]["documents"] == 2
    assert manifest["skipped"]["by_reason"] == {
        "invalid JSON": 1,
        "no string field 'text'": 1,
        "not UTF-8": 1,
    }
    assert _decoded(tmp_path / "ds", "train") == ["one", "two"]


def test_output_dir_with_a_different_dataset_is_refused(tmp_path, jsonl, tokenizer) -> None:
    build_shards(
        [jsonl], tmp_path / "ds", tokenizer, ShardOptions(docs_per_shard=1000), progress=False
    )
    before = _files(tmp_path / "ds")
    with pytest.raises(InputError, match="holds a different dataset"):
        build_shards(
            [jsonl], tmp_path / "ds", tokenizer, ShardOptions(docs_per_shard=500), progress=False
        )
    assert _files(tmp_path / "ds") == before  # nothing touched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="not a SlowQK dataset"):
        build_shards([jsonl], tmp_path / "other", tokenizer, progress=False)
    assert (tmp_path / "other" / "keep.txt").read_text() == "user data"
    # the same inputs and options again: reused as is
    again = build_shards(
        [jsonl], tmp_path / "ds", tokenizer, ShardOptions(docs_per_shard=1000), progress=False
    )
    assert _files(tmp_path / "ds") == before and again["splits"]["train"]["documents"] > 0


def test_tokenizer_mismatch_is_refused(tmp_path, jsonl, tokenizer, docs) -> None:
    manifest = build_shards([jsonl], tmp_path / "ds", tokenizer, progress=False)
    other = train_sentencepiece(docs[:2000], tmp_path / "other.model", 600)
    check_tokenizer(tokenizer, tmp_path / "ds", manifest)
    with pytest.raises(InputError, match="is not the tokenizer"):
        check_tokenizer(other, tmp_path / "ds", manifest)


def test_held_out_files_and_hf_tokenizer_json(tmp_path, docs) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        docs,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("\n\n".join(docs[:500]) + "\n")
    valid.write_text("\n\n".join(docs[500:550]) + "\n")
    manifest = build_shards(
        [train, valid],
        tmp_path / "ds",
        tok_path,
        ShardOptions(valid_files=(str(valid),)),
        progress=False,
    )
    assert manifest["splits"]["valid"]["documents"] == 50
    assert manifest["tokenizer"]["file"] == "tokenizer.json"
    assert _decoded(tmp_path / "ds", "valid") == docs[500:550]
    verify_dataset(tmp_path / "ds")


def test_blend_weights_follow_datasets_then_shard_sizes(tmp_path, jsonl, tokenizer) -> None:
    a = build_shards(
        [jsonl], tmp_path / "a", tokenizer, ShardOptions(docs_per_shard=300), progress=False
    )
    build_shards(
        [jsonl], tmp_path / "b", tokenizer, ShardOptions(docs_per_shard=5000), progress=False
    )
    prefixes, weights = blend([tmp_path / "a", tmp_path / "b"], [3.0, 1.0], "train")
    n_a = len(a["splits"]["train"]["shards"])
    assert len(prefixes) == n_a + 1
    assert sum(weights[:n_a]) == pytest.approx(3.0) and weights[n_a] == pytest.approx(1.0)
    assert parse_split("98,1,1") == pytest.approx((0.98, 0.01, 0.01))
    with pytest.raises(ValueError, match="comma-separated"):
        parse_split("a,b")


def test_bulk_append_writes_the_same_bytes_as_add_document(tmp_path) -> None:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from slowqk.data import shard

    rng = np.random.default_rng(0)
    docs = [
        rng.integers(0, 500, size=int(n)).astype(np.uint16) for n in rng.integers(1, 50, size=200)
    ]
    slow = IndexedDatasetBuilder(str(tmp_path / "slow.bin"), dtype=np.uint16)
    for d in docs:
        slow.add_document(d, [len(d)])
    slow.finalize(str(tmp_path / "slow.idx"))
    fast = IndexedDatasetBuilder(str(tmp_path / "fast.bin"), dtype=np.uint16)
    lengths = np.array([len(d) for d in docs])
    shard.append_documents(
        fast, np.concatenate(docs[:120]), lengths[:120]
    )  # two calls: offsets carry on
    shard.append_documents(fast, np.concatenate(docs[120:]), lengths[120:])
    fast.finalize(str(tmp_path / "fast.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"fast{ext}").read_bytes() == (tmp_path / f"slow{ext}").read_bytes()


def test_too_small_vocabulary_is_a_clear_error(tmp_path, docs) -> None:
    with pytest.raises(
        ValueError,
        match="tokenizer training failed \\(vocab_size=100\\): Vocabulary size is smaller",
    ):
        train_sentencepiece(docs[:500], tmp_path / "t.model", 100)
    assert not (tmp_path / "t.model").exists()
