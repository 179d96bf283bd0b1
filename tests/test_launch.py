"""Local launch: layouts are checked before anything starts; --dry-run prints the exact command."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import SHARED

from slowqk.cli import main


@pytest.mark.parametrize(
    "argv,layout,expect",
    [
        (["--nproc", "1"], "world 1 = TP 1 x PP 1 x DP 1", []),
        (["--nproc", "2", "--tp", "2"], "world 2 = TP 2 x PP 1 x DP 1", ["parallel.tensor=2"]),
        (["--nproc", "4", "--pp", "2"], "world 4 = TP 1 x PP 2 x DP 2", ["parallel.pipeline=2"]),
        (
            ["--nproc", "8", "--tp", "2", "--pp", "2"],
            "world 8 = TP 2 x PP 2 x DP 2",
            ["parallel.tensor=2", "parallel.pipeline=2"],
        ),
    ],
)
def test_dry_run_prints_the_command(argv, layout, expect, capsys) -> None:
    assert main(["launch", *argv, "--dry-run", "tiny/gpt", "train.steps=5"]) == 0
    out, err = capsys.readouterr()
    cmd = shlex.split(out.strip())
    assert cmd[0].endswith("torchrun") and "--standalone" in cmd
    assert f"--nproc-per-node={argv[1]}" in cmd
    assert cmd[cmd.index("-m") + 1 : cmd.index("-m") + 4] == ["slowqk.cli", "train", "tiny/gpt"]
    assert "train.steps=5" in cmd and all(e in cmd for e in expect)
    assert layout in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--nproc", "3", "--tp", "2"],
            "world size 3 is not divisible by tensor (2) x pipeline (1)",
        ),
        (["--nproc", "6", "--tp", "4"], "world size 6 is not divisible by tensor (4)"),
        (["--nproc", "3", "--pp", "2"], "not divisible by tensor (1) x pipeline (2)"),
        (
            ["--nproc", "3", "--pp", "3"],
            "key 'parallel.pipeline': got 3; it must divide model.num_layers (4)",
        ),
        (
            ["--nproc", "3", "--tp", "3"],
            "key 'parallel.tensor': got 3; it must divide model.num_attention_heads (4)",
        ),
        (
            ["--nproc", "4"],
            "train.global_batch_size (16) is not a multiple of train.micro_batch_size (8) x DP (4)",
        ),
        (["--nproc", "0"], "--nproc must be >= 1"),
    ],
)
def test_bad_layouts_say_what_is_wrong(argv, message, capsys) -> None:
    assert main(["launch", *argv, "--dry-run", "tiny/gpt"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_launch_runs_torchrun_for_real(tmp_path) -> None:
    """`slowqk launch` execs torchrun, which starts two ranks (TP=2) that train and finish."""
    corpus = tmp_path / "corpus.txt"
    src = SHARED / "data" / "tinyshakespeare" / "input.txt"
    corpus.write_text("".join(src.read_text().splitlines(keepends=True)[:2000]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slowqk.cli",
            "launch",
            "--nproc",
            "2",
            "--tp",
            "2",
            "tiny/gpt",
            f"data.corpus={corpus}",
            "data.tokenizer_vocab_size=512",
            f"out_dir={tmp_path / 'run'}",
            "model.seq_length=32",
            "train.steps=4",
            "train.eval_interval=2",
            "train.eval_iters=1",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            "train.progress_bar=false",
            "train.tensorboard=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_val_loss"] > 0


@pytest.mark.parametrize(
    "recipe,argv,layout,expect",
    [
        (
            "llama-350m",
            ["--nodes", "2", "--gpus-per-node", "8"],
            "16 ranks = 2 nodes x 8 = TP 1 x PP 1 x DP 16",
            ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"],
        ),
        (
            "tiny/gpt",
            ["--nodes", "1", "--tasks-per-node", "4", "--time", "1:00:00", "parallel.tensor=2"],
            "4 ranks = 1 nodes x 4 = TP 2 x PP 1 x DP 2",
            ["--ntasks-per-node=4", "--time=1:00:00"],
        ),
    ],
)
def test_submit_dry_run_fills_sbatch_from_the_layout(recipe, argv, layout, expect, capsys) -> None:
    assert main(["submit", recipe, *argv, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    cmd = shlex.split(out.strip())
    assert cmd[0] == "sbatch" and "--signal=USR1@180" in cmd and all(e in cmd for e in expect)
    script = next(c for c in cmd if c.endswith("slowqk.sbatch"))
    assert cmd[cmd.index(script) + 1] == recipe and os.path.isfile(script)
    assert layout in err


def test_submit_refuses_a_layout_that_does_not_fit(capsys) -> None:
    assert (
        main(
            [
                "submit",
                "tiny/gpt",
                "--nodes",
                "1",
                "--tasks-per-node",
                "3",
                "parallel.tensor=2",
                "--dry-run",
            ]
        )
        == 2
    )
    assert "world size 3 is not divisible by tensor (2)" in capsys.readouterr().err
    assert main(["submit", "tiny/gpt", "--nodes", "2", "--gpus-per-node", "8", "--dry-run"]) == 2
    assert (
        "train.global_batch_size (16) is not a multiple of train.micro_batch_size (8) x DP (16)"
        in capsys.readouterr().err
    )
