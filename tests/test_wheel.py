"""The project as a user of a wheel gets it: built, installed outside the checkout, run
elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO, SHARED


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh virtual environment whose only copy of slowqk is the wheel's. Its dependencies come
    from the test environment's site-packages, added by a .pth line (which does not run that
    directory's own .pth files, so the checkout's editable install stays out)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((root / "dist").glob("slowqk-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SLOWQK_SHARED_DIR")}
    return {"python": str(python), "site": site, "cwd": elsewhere, "env": env}


def _run(installed: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [installed["python"], *args],
        cwd=installed["cwd"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_wheel_is_what_runs_and_it_knows_its_recipes(installed) -> None:
    where = _run(
        installed, "-c", "import slowqk, slowqk.patches, slowqk.hf.export; print(slowqk.__file__)"
    )
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.strip().startswith(str(installed["site"]))  # not the checkout
    shown = _run(installed, "-m", "slowqk.cli", "print-recipe", "gpt-125m")
    assert shown.returncode == 0 and "name: gpt-125m" in shown.stdout, shown.stderr[-2000:]
    unknown = _run(installed, "-m", "slowqk.cli", "print-recipe", "nope")
    assert unknown.returncode == 2 and "tiny/gpt" in unknown.stderr and "llama-1b" in unknown.stderr


def test_the_wheel_holds_every_module_of_the_checkout(installed) -> None:
    """A package left out of pyproject's list would import from the checkout, not from a wheel."""
    names = sorted(
        ".".join(("slowqk", *path.relative_to(REPO / "slowqk").with_suffix("").parts))
        for path in (REPO / "slowqk").rglob("*.py")
        if path.name != "__init__.py"
    )
    script = (
        "import importlib.util, sys\n"
        "missing = [n for n in sys.argv[1:] if importlib.util.find_spec(n) is None]\n"
        "print(' '.join(missing))"
    )
    found = _run(installed, "-c", script, *names)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == "", f"not in the wheel: {found.stdout.strip()}"


@pytest.mark.slow
def test_the_wheel_trains_tiny_gpt_from_another_directory(installed) -> None:
    corpus = installed["cwd"] / "corpus.txt"
    corpus.write_text(
        "".join((SHARED / "data/tinyshakespeare/input.txt").read_text().splitlines(True)[:3000])
    )
    res = _run(
        installed,
        "-m",
        "slowqk.cli",
        "train",
        "tiny/gpt",
        f"data.corpus={corpus}",
        "data.tokenizer_vocab_size=400",
        "train.steps=3",
        "model.seq_length=32",
        "train.tensorboard=false",
        "out_dir=run",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (installed["cwd"] / "run" / "summary.json").is_file()
