"""The README's commands, run as written, in a shell set up as the README says (the environment
activated), in a scratch folder that stands in for the repository root.

Every shell block of the README carries a marker on the line before it:
``<!-- ci: run | file PATH | line "TEXT" -->`` (run each command in CI; afterwards each PATH
exists and each TEXT is a line, or part of one, of the block's output) or
``<!-- ci: skip -- WHY -->``. The only departures from the README are named below: fewer steps, a
smaller model, a smaller tokenizer and sample, and the corpus the data commands read.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest
from conftest import REPO, SHARED

pytestmark = pytest.mark.slow
README = REPO / "README.md"
MARKER = re.compile(r"^<!-- ci: (run|skip)(.*)-->$")

# --- the one place where CI departs from the README --------------------------------------------
# appended to every command that trains: a few steps (and, for the GPU recipes, a small model)
FEW_STEPS = [
    "train.steps=4",
    "train.eval_interval=4",
    "train.eval_iters=1",
    "train.log_interval=1",
    "train.tensorboard=false",
    "train.progress_bar=false",
]
SMALL_MODEL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=256",
    "model.num_attention_heads=4",
    "model.num_query_groups=null",
    "model.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.precision=fp32",
]
# the README's sizes for real corpora, made small for a corpus of a few thousand lines
REPLACE = {
    "--vocab-size 32000": "--vocab-size 400",
    "--sample-docs 2000000": "--sample-docs 5000",
    "--workers 8": "--workers 2",
    "--limit 200": "--limit 4",
}
# what the data commands read: corpus/web/*.jsonl and corpus/books/*.jsonl (tiny Shakespeare)
TRAINS = re.compile(r"(^|\s)(slowqk (train|launch) |bash launch/train\.sh )")
GPU_RECIPES = re.compile(r"(^|\s)(gpt|llama)-\d")


def blocks() -> list[tuple[int, str, str, list[str]]]:
    """``(line, marker kind, marker rest, commands)`` of every shell block, in order."""
    lines = README.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.strip() != "```bash":
            continue
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        body, j = [], i + 1
        while lines[j].strip() != "```":
            body.append(lines[j])
            j += 1
        commands, pending = [], ""
        for raw in body:
            text = pending + raw
            if text.rstrip().endswith("\\"):
                pending = text.rstrip()[:-1] + " "
                continue
            pending = ""
            if text.strip() and not text.strip().startswith("#"):
                commands.append(text.strip())
        kind, rest = (marker.group(1), marker.group(2)) if marker else ("", "")
        out.append((i + 1, kind, rest, commands))
    return out


def test_every_shell_block_says_whether_ci_runs_it() -> None:
    unmarked = [line for line, kind, _, _ in blocks() if not kind]
    assert not unmarked, f"README.md lines {unmarked}: a shell block without <!-- ci: ... -->"
    for line, kind, rest, _ in blocks():
        if kind == "skip":
            assert rest.strip().startswith("--") and len(rest.strip()) > 10, (
                f"README.md line {line}: a skipped block says why (<!-- ci: skip -- WHY -->)"
            )


def _adapt(command: str) -> str:
    """The README's command with the departures above."""
    for old, new in REPLACE.items():
        command = command.replace(old, new)
    if TRAINS.search(command) and "--dry-run" not in command:
        command, _, comment = command.partition("  #")
        extra = FEW_STEPS + (SMALL_MODEL if GPU_RECIPES.search(command) else [])
        command = command.rstrip() + " " + " ".join(shlex.quote(x) for x in extra)
    return command


def _expectations(rest: str) -> tuple[list[str], list[str]]:
    files, texts = [], []
    for item in (x.strip() for x in rest.split("|") if x.strip()):
        what, _, value = item.partition(" ")
        if what == "file":
            files.append(value.strip())
        elif what == "line":
            texts.append(value.strip().strip('"'))
        else:
            raise AssertionError(f"README marker: unknown expectation {item!r} (file or line)")
    return files, texts


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A folder standing in for the repository root (its code, recipes and environment linked),
    with the corpora the data commands read, and the environment activated."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("recipes", "launch", "tools", "docker", ".venv", "slowqk", "pyproject.toml"):
        (root / name).symlink_to(REPO / name)
    text = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
    for folder, docs in (("web", text[:1500]), ("books", text[1500:2500])):
        (root / "corpus" / folder).mkdir(parents=True)
        with open(root / "corpus" / folder / "part-0.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs if d.strip())
    venv = REPO / ".venv"
    env = {
        **os.environ,
        "VIRTUAL_ENV": str(venv),
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "SLOWQK_SHARED_DIR": str(SHARED),
        "OMP_NUM_THREADS": "1",
    }
    return {"root": root, "env": env}


RUN_BLOCKS = [b for b in blocks() if b[1] == "run"]


@pytest.mark.parametrize(
    "block", RUN_BLOCKS, ids=[re.sub(r"[^a-z0-9.]+", "-", b[3][0])[:48] for b in RUN_BLOCKS]
)
def test_the_readme_commands_work_as_written(block, workspace) -> None:
    line, _, rest, commands = block
    files, texts = _expectations(rest)
    output = []
    for command in commands:
        adapted = _adapt(command)
        proc = subprocess.run(
            ["bash", "-c", adapted],
            cwd=workspace["root"],
            env=workspace["env"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        output.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, (
            f"README.md line {line}: `{command}` exited {proc.returncode} (run as `{adapted}`):\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
        # no traceback, and nothing a subprocess printed by mistake (git outside a checkout)
        assert "Traceback" not in proc.stderr and "fatal:" not in proc.stderr, proc.stderr[-3000:]
    missing = [f for f in files if not (workspace["root"] / f).exists()]
    assert not missing, f"README.md line {line}: documented outputs missing: {missing}"
    text = "\n".join(output)
    absent = [t for t in texts if t not in text]
    assert not absent, f"README.md line {line}: documented lines missing: {absent}\n{text[-2000:]}"
