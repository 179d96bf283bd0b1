"""A full disk during a checkpoint save, on a real (small) tmpfs: one line and exit 2, the previous
checkpoint and ``latest`` intact, no partial copy left, and a resume with space continues
bitwise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, SHARED
from multiproc import run_cli, run_ranks

pytestmark = pytest.mark.slow
CORPUS = SHARED / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from slowqk.data.corpus import prepare_corpus

    root = tmp_path_factory.mktemp("data")
    small = root / "corpus.txt"
    small.write_text("".join(CORPUS.read_text().splitlines(keepends=True)[:2000]))
    return str(prepare_corpus(small, root / "prepared", vocab_size=384).dataset_dir)


def _args(dataset: str, run_dir: Path) -> list[str]:
    base = {
        "out_dir": str(run_dir),
        "data.corpus": "null",
        "data.dataset": dataset,
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.seq_length": 32,
        "train.steps": 6,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.log_interval": 1,
        "train.eval_interval": 6,
        "train.eval_iters": 1,
        "train.save_interval": 2,
        "train.keep_last": 5,
        "train.progress_bar": "false",
        "train.tensorboard": "false",
        "optimizer.warmup_steps": 2,
    }
    return [f"{k}={v}" for k, v in base.items()]


def _losses(run_dir: Path) -> dict[int, float]:
    from slowqk.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs mount point; the test sets its size with ``remount``."""
    where = tmp_path / "small"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def _train_with_free_space_misreported(rank: int, world: int, args: list[str]) -> str:
    """Train with the free-space check fooled, so the save itself meets ENOSPC mid-write."""
    from collections import namedtuple

    import slowqk.checkpoint as ckpt
    from slowqk.config import load_recipe
    from slowqk.train import train

    usage = namedtuple("usage", "total used free")
    ckpt.shutil.disk_usage = lambda path: usage(2**40, 0, 2**40)
    try:
        train(load_recipe("tiny/gpt", args), quiet=True)
    except ckpt.CheckpointSpaceError as exc:
        return str(exc)
    return "no error"


def test_a_full_disk_is_one_line_and_loses_nothing(dataset, tmp_path, small_tmpfs) -> None:
    from slowqk.checkpoint import verify_checkpoint

    full = tmp_path / "full"
    proc = run_cli(["train", "tiny/gpt", *_args(dataset, full), "--quiet"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = _losses(full)
    ckpt = _size(full / "checkpoints" / "iter_0000002")

    # room for the run's files and one checkpoint and a half: the step-4 save cannot fit
    run = small_tmpfs / "run"
    _resize(small_tmpfs, int(1.5 * ckpt) + 2**20)
    proc = run_cli(["train", "tiny/gpt", *_args(dataset, run), "--quiet"], cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error: checkpoint at step 4: "), errors
    assert (
        str(run / "checkpoints") in errors[0] and "needs about" in errors[0] and "MiB" in errors[0]
    )
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000002", "latest"]
    verify_checkpoint(run / "checkpoints" / "iter_0000002")

    # the check fooled: the save runs into ENOSPC while writing, and cleans up after itself
    message = run_ranks(_train_with_free_space_misreported, 1, _args(dataset, run))[0]
    assert (
        message.startswith("checkpoint at step 4: ") and "ran out of space while writing" in message
    ), message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000002", "latest"]
    verify_checkpoint(run / "checkpoints" / "iter_0000002")

    # a partial copy a crash left behind is removed at the next start; a resume with space is
    # bitwise
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    (moved / "checkpoints" / "iter_0000004.tmp").mkdir()
    (moved / "checkpoints" / "iter_0000004.tmp" / "junk").write_bytes(b"x" * 100)
    proc = run_cli(["train", "tiny/gpt", *_args(dataset, moved), "--quiet"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (moved / "checkpoints" / "iter_0000004.tmp").exists()
    got = _losses(moved)
    assert all(got[s] == reference[s] for s in (3, 4, 5, 6)), (got, reference)
