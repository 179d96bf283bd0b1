"""Recipe validation: bad recipes and overrides fail with a message naming the key and value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slowqk.cli import main
from slowqk.config import RecipeError, load_recipe

BAD_OVERRIDES = [
    (["model.ffn=relu"], "model.ffn", "relu"),
    (["model.norm=batchnorm"], "model.norm", "batchnorm"),
    (["model.num_layers=0"], "model.num_layers", "0"),
    (["model.hidden_size=100", "model.num_attention_heads=3"], "model.hidden_size", "100"),
    (["model.num_query_groups=3"], "num_query_groups", "3"),
    (["model.hidden_szie=64"], "hidden_szie", "did you mean 'hidden_size'"),
    (["optimizer.name=lamb"], "optimizer.name", "lamb"),
    (["optimizer.lr=-1"], "optimizer.lr", "-1"),
    (["optimizer.min_lr=1.0"], "optimizer.min_lr", "1.0"),
    (["qk.shape=sigmoid"], "qk.shape", "sigmoid"),
    (["qk.layers.top=2"], "qk.layers", "exactly one"),
    (["qk.unit=epochs"], "qk.unit", "epochs"),
    (["qk.mult_q=abc"], "qk.mult_q", "abc"),
    (["train.steps=ten"], "train.steps", "ten"),
    (["parallel.tensor=0"], "parallel.tensor", "0"),
    (["data.corpus=null"], "data", "data.corpus or data.train_prefixes"),
    (["model=3"], "model", "3"),
    (["model.ffn.kind=gelu"], "model.ffn", "is a value, not a section"),
    (["novalue"], "novalue", "key.sub=value"),
    (["seed=[1"], "seed", "not valid YAML"),
    # checks across sections, made when the recipe loads
    (["qk.hold=1.5"], "qk.hold", "fraction of train.steps, at most 1"),
    (["qk.ramp=2"], "qk.ramp", "at most 1"),
    (["qk.layers={top: 99}"], "qk.layers", "top=99 must be between 1 and the number of layers (4)"),
    (["qk.layers={indices: [9]}"], "qk.layers", "layer indices [9] out of range for 4 layers"),
    (
        ["qk.unit=steps", "qk.hold=2.5"],
        "qk.hold",
        "got 2.5; a length in steps must be a whole number",
    ),
    (
        ["qk.hold=0.7", "qk.ramp=0.5"],
        "qk.hold",
        "more than the whole run, the slowdown would never end",
    ),
    (["parallel.tensor=3"], "parallel.tensor", "it must divide model.num_attention_heads (4)"),
    (["parallel.pipeline=3"], "parallel.pipeline", "it must divide model.num_layers (4)"),
    (
        ["train.global_batch_size=12"],
        "train.global_batch_size",
        "multiple of train.micro_batch_size (8)",
    ),
]


@pytest.mark.parametrize(
    "overrides,key,detail", BAD_OVERRIDES, ids=[" ".join(o[0]) for o in BAD_OVERRIDES]
)
def test_bad_override_names_key_and_value(overrides, key, detail, capsys) -> None:
    code = main(["print-recipe", "tiny/gpt", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert key in err and detail in err, err
    assert "Traceback" not in err


def test_fewer_query_groups_than_tensor_ranks_is_allowed() -> None:
    """megatron-core replicates K/V when the TP size is a multiple of the groups."""
    r = load_recipe(
        "tiny/gpt", ["model.num_query_groups=2", "parallel.tensor=4", "model.num_attention_heads=8"]
    )
    assert r.parallel.tensor == 4


def test_train_refuses_what_print_recipe_refuses_before_any_data_work(tmp_path, capsys) -> None:
    """The same one line from `train` as from `print-recipe`, and nothing written: no data
    prepared."""
    out = tmp_path / "run"
    for overrides in (["qk.hold=1.5"], ["qk.layers={top: 99}"], ["parallel.tensor=3"]):
        assert main(["print-recipe", "tiny/gpt", *overrides]) == 2
        printed = capsys.readouterr().err
        assert main(["train", "tiny/gpt", *overrides, f"out_dir={out}"]) == 2
        assert capsys.readouterr().err == printed and printed.count("\n") == 1
        assert not out.exists()


def test_bad_recipe_file(tmp_path, capsys) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("- a list\n- not a mapping\n")
    assert main(["print-recipe", str(f)]) == 2
    assert "expected a mapping" in capsys.readouterr().err
    f.write_text("model: {ffn: [unclosed\n")
    assert main(["print-recipe", str(f)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_unknown_recipe_lists_known(capsys) -> None:
    assert main(["print-recipe", "tiny/nope"]) == 2
    err = capsys.readouterr().err
    assert "tiny/nope" in err and "tiny/gpt" in err


def test_overrides_and_inheritance() -> None:
    r = load_recipe(
        "tiny/llama", ["qk.enabled=true", "qk.layers={indices: [1, 3]}", "train.steps=7"]
    )
    assert (r.model.ffn, r.model.norm, r.model.bias, r.model.position) == (
        "swiglu",
        "rmsnorm",
        False,
        "rope",
    )
    assert r.model.hidden_size == 128  # inherited from tiny/gpt
    assert r.qk.enabled and r.qk.layers.indices == [1, 3] and r.train.steps == 7
    with pytest.raises(RecipeError):
        load_recipe("tiny/gpt", ["qk.layers={top: 2, top_fraction: 0.5}"])


def test_print_recipe_subprocess_exit_code() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "slowqk.cli", "print-recipe", "tiny/gpt", "model.ffn=relu"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "model.ffn" in proc.stderr and "relu" in proc.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "slowqk.cli", "print-recipe", "tiny/gpt", "qk.enabled=true"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "enabled: true" in ok.stdout


def test_a_data_source_override_replaces_the_recipe_s_source_and_its_tokenizer() -> None:
    r = load_recipe("gpt-125m", ["data.dataset=data/web"])
    assert r.data.dataset == "data/web" and r.data.train_prefixes == []
    assert r.data.tokenizer is None and r.data.valid_prefixes == []  # the dataset's own tokenizer
    r = load_recipe(
        "gpt-125m", ["data.dataset=[data/web, data/books]", "data.train_weights=[3, 1]"]
    )
    assert r.data.dataset == ["data/web", "data/books"] and r.data.train_weights == [3.0, 1.0]
    r = load_recipe("gpt-125m", ["data.tokenizer=t.model", "data.dataset=data/web"])
    assert r.data.tokenizer == "t.model"  # named alongside: kept, whatever the order
    r = load_recipe("tiny/gpt", ["data.dataset=d"])
    assert r.data.corpus is None and r.data.tokenizer_vocab_size == 2048
    assert load_recipe("gpt-125m", ["data.tokenizer=t.model"]).data.train_prefixes == ["data/train"]


def test_the_bundled_corpus_is_found_from_any_directory(tmp_path, monkeypatch) -> None:
    from conftest import SHARED

    monkeypatch.chdir(tmp_path)
    corpus = load_recipe("tiny/gpt").data.corpus
    assert corpus == str((SHARED / "data" / "tinyshakespeare" / "input.txt").resolve())
    monkeypatch.setenv("SLOWQK_SHARED_DIR", str(tmp_path))
    assert load_recipe("tiny/gpt").data.corpus == str(tmp_path / "data/tinyshakespeare/input.txt")


def test_a_data_path_named_another_way_is_not_a_recipe_change(tmp_path, monkeypatch) -> None:
    from slowqk.config.changes import run_altering_changes

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared").mkdir()
    saved = {"data": {"corpus": "shared/input.txt", "dataset": None}}
    same = {"data": {"corpus": str(tmp_path / "shared" / "input.txt"), "dataset": None}}
    other = {"data": {"corpus": str(tmp_path / "other.txt"), "dataset": None}}
    assert run_altering_changes(saved, same) == []
    assert run_altering_changes(saved, other) == [
        f"data.corpus: 'shared/input.txt' -> {str(tmp_path / 'other.txt')!r}"
    ]
