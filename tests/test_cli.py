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


@pytest.mark.slow
def test_log_lines_reach_the_terminal_ranked_and_leveled(small_dataset, tmp_path) -> None:
    """INFO lines (the adaptive release among them) on stderr by default in one format; --quiet
    keeps only warnings; --log-level sets the level wherever it stands; with several ranks each
    line names its rank, and only rank 0 says what every rank would repeat."""
    base = [
        "tiny/gpt",
        "data.corpus=null",
        f"data.dataset={small_dataset}",
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.seq_length=32",
        "train.steps=6",
        "train.eval_interval=6",
        "train.eval_iters=1",
        "train.tensorboard=false",
        "train.progress_bar=false",
        "qk.enabled=true",
        "qk.release=adaptive",
        "qk.unit=steps",
        "qk.ramp=1",
        "qk.adaptive.min_hold=1",
        "qk.adaptive.max_hold=2",
    ]

    def train(*args: str, launcher: tuple[str, ...] = ("train",)) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "slowqk.cli", *launcher, *args],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr

    err = train(*base, f"out_dir={tmp_path / 'a'}")
    release = [x for x in err.splitlines() if "qk: release at step" in x]
    assert len(release) == 1 and " INFO qk: release at step 2: " in release[0], err
    assert "[rank" not in err
    assert " INFO " not in train(*base, f"out_dir={tmp_path / 'b'}", "--quiet")
    debug = train("--log-level", "WARNING", *base, f"out_dir={tmp_path / 'c'}")
    assert " INFO " not in debug
    err = train(*base, f"out_dir={tmp_path / 'd'}", launcher=("launch", "--nproc", "2"))
    release = [x for x in err.splitlines() if "qk: release at step" in x]
    assert len(release) == 1 and " INFO [rank 0] qk: release at step 2: " in release[0], err
    assert " INFO [rank 1]" not in err
