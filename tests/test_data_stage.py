"""The data stage: a recipe's corpus prepared once by `slowqk prepare-data` (or by `slowqk train`
before it trains); the training side only opens prepared data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SHARED

from slowqk.cli import main
from slowqk.config import load_recipe
from slowqk.data.run_data import resolve_sources


def _file_stamps(root) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and "cache" not in p.parts and not p.name.startswith(".")
    }


@pytest.mark.slow
def test_training_reads_the_prepared_data_and_never_tokenizes(tmp_path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join(
            (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text().splitlines(True)[:2000]
        )
    )
    out = tmp_path / "run"
    args = [
        "tiny/gpt",
        f"out_dir={out}",
        f"data.corpus={corpus}",
        "data.tokenizer_vocab_size=384",
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.seq_length=32",
        "train.steps=2",
        "train.eval_interval=2",
        "train.eval_iters=1",
        "train.tensorboard=false",
    ]
    with pytest.raises(FileNotFoundError, match="not prepared in .*; run `slowqk prepare-data"):
        resolve_sources(load_recipe(args[0], args[1:]))  # the training side: no stage, no data

    assert main(["prepare-data", *args]) == 0
    assert "train: " in capsys.readouterr().out
    stage = json.loads((out / "data" / "stage.json").read_text())
    assert stage["inputs"]["corpus"] == str(corpus) and stage["inputs"]["vocab_size"] == 384
    assert (out / "data" / "dataset" / "manifest.json").is_file()
    before = _file_stamps(out / "data")

    train = subprocess.run(
        [sys.executable, "-m", "slowqk.cli", "train", *args, "--quiet"],
        capture_output=True,
        text=True,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert json.loads(train.stdout.strip().splitlines()[-1])["steps"] == 2
    assert _file_stamps(out / "data") == before  # tokenizer, shards, manifest: read, not rewritten

    # a run's prepared data are never replaced by a preparation from other inputs
    assert main(["prepare-data", *args, "data.tokenizer_vocab_size=512"]) == 2
    err = capsys.readouterr().err
    assert "holds a preparation from other inputs" in err and "use another out_dir" in err
    assert _file_stamps(out / "data") == before


def test_a_touched_corpus_is_reused_and_a_changed_one_refused(tmp_path) -> None:
    import os

    from slowqk.data.stage import prepare_stage

    corpus = tmp_path / "corpus.txt"
    lines = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text().splitlines(True)
    corpus.write_text("".join(lines[:1500]))
    data = load_recipe("tiny/gpt", [f"data.corpus={corpus}", "data.tokenizer_vocab_size=384"]).data
    where = tmp_path / "prepared"
    dataset = prepare_stage(data, where)
    before = _file_stamps(where)
    os.utime(corpus, ns=(1, 1))  # touched (copied, checked out), the same bytes
    assert prepare_stage(data, where) == dataset and _file_stamps(where) == before
    corpus.write_text("".join(lines[:1400]))  # other bytes: runs may be reading the old data
    with pytest.raises(ValueError, match="the file changed since it was prepared"):
        prepare_stage(data, where)
    assert _file_stamps(where) == before
