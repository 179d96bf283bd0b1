"""The command line as a new user meets it: help, messages that say where a value came from,
existing destinations, a quiet import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slowqk.cli import main


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in (
        "train",
        "launch",
        "experiment",
        "submit",
        "export-hf",
        "import-hf",
        "evaluate",
        "quickstart",
        "print-recipe",
        "tokenizer",
        "data",
        "prepare-data",
    ):
        assert f"\n    {command}" in out, command


def test_override_errors_name_the_override_and_what_is_allowed(capsys) -> None:
    assert main(["print-recipe", "tiny/gpt", "model.ffn=relu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "recipe error: override 'model.ffn=relu': key 'model.ffn': got 'relu'; "
        "expected 'gelu' or 'swiglu'"
    )
    assert main(["print-recipe", "tiny/gpt", "qk.hold=1.5"]) == 2
    assert "override 'qk.hold=1.5': key 'qk.hold'" in capsys.readouterr().err


def test_print_recipe_resolves_out_dir(capsys) -> None:
    assert main(["print-recipe", "tiny/gpt"]) == 0
    out = capsys.readouterr().out
    assert "out_dir: runs/tiny-gpt\n" in out and "${name}" not in out


def test_known_recipes_are_recipes() -> None:
    from slowqk.config import known_recipes, load_recipe

    names = known_recipes()
    assert "llama-1b" in names and "tiny/gpt" in names and "study/grid" not in names
    for name in names:
        load_recipe(name)  # every listed name loads


def test_quickstart_steps_zero_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "qs"
    assert main(["quickstart", "--steps", "0", "--out", str(out)]) == 2
    assert "train.steps=0" in capsys.readouterr().err and not out.exists()


def test_export_onto_an_existing_directory_is_one_line(tmp_path, capsys) -> None:
    existing = tmp_path / "hf"
    existing.mkdir()
    assert main(["export-hf", str(tmp_path / "no-checkpoint"), str(existing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --overwrite" in err


def test_importing_slowqk_prints_no_dependency_warnings() -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import slowqk.train, slowqk.models, slowqk.optim"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "not installed" not in proc.stderr, proc.stderr[-2000:]


def test_evaluate_table_labels_columns_by_model() -> None:
    from slowqk.evaluate import format_results

    table = format_results(
        {
            "/x/runs/a/hf/eval_results.json": {"tasks": {"t": {"acc": 0.5}}},
            "/y/b.json": {"tasks": {"t": {"acc": 0.25}}},
        }
    )
    head = table.splitlines()[0]
    assert "a/hf" in head and head.rstrip().endswith("b") and "eval_results" not in head
