"""Property: random byte damage to a dataset or a checkpoint never gets past the checks a run makes
when it opens them, and never produces a traceback: the check either passes on bytes identical to
the originals, or refuses with one line naming a file of the damaged directory.

The gates exercised are the ones the training loop calls (``resolve_sources``'s dataset checks;
``latest_checkpoint``'s verification); `tests/test_faults.py` shows end to end that a refused
checkpoint is never loaded. Random recipe overrides are `tests/test_config_property.py`'s part.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DAMAGE = st.tuples(
    st.integers(0, 10**6),  # which file (modulo the count)
    st.sampled_from(["flip", "truncate", "append", "zero", "delete"]),
    st.floats(0, 1, allow_nan=False),  # where in the file
    st.integers(1, 4096),  # how many bytes
)


def damage(root: Path, choice: tuple, skip: tuple[str, ...] = ()) -> Path:
    """Apply one random damage to one file under ``root``; returns the file."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip)
    index, op, where, n = choice
    target = files[index % len(files)]
    data = bytearray(target.read_bytes())
    at = int(where * len(data))
    if op == "delete":
        target.unlink()
        return target
    if op == "flip":
        data[at : at + n] = bytes(b ^ 0xA5 for b in data[at : at + n])
    elif op == "truncate":
        data = data[:at]
    elif op == "append":
        data += bytes(range(256)) * (n // 256 + 1)
    else:
        data[at : at + n] = bytes(len(data[at : at + n]))
    target.write_bytes(bytes(data))
    return target


def identical(a: Path, b: Path, skip: tuple[str, ...] = ()) -> bool:
    def files(root):
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and p.name not in skip
        }

    return files(a) == files(b)


OUTCOMES = {"dataset": {"refused": 0, "harmless": 0}, "checkpoint": {"refused": 0, "harmless": 0}}
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def pristine_dataset(small_dataset) -> Path:
    return Path(small_dataset)


def _open_dataset(root: Path) -> None:
    """What resolve_sources checks when a run opens ``data.dataset`` (with data.verify on)."""
    from slowqk.data.shard import check_tokenizer, load_manifest
    from slowqk.data.verify import check_dataset_on_open

    manifest = load_manifest(root)
    check_tokenizer(root / manifest["tokenizer"]["file"], root, manifest)
    check_dataset_on_open(root, manifest, hashes=True)


@SETTINGS
@given(DAMAGE)
def test_damaged_dataset_is_refused_in_one_line(pristine_dataset, tmp_path_factory, choice) -> None:
    from slowqk.data.sources import InputError
    from slowqk.data.verify import VerifyError

    root = tmp_path_factory.mktemp("ds") / "dataset"
    shutil.copytree(pristine_dataset, root)
    target = damage(root, choice, skip=("build.json",))  # the build log: never read by a run
    try:
        _open_dataset(root)
    except (InputError, VerifyError, FileNotFoundError) as exc:
        msg = str(exc)
        assert "\n" not in msg and str(root) in msg, msg
        OUTCOMES["dataset"]["refused"] += 1
    else:
        assert identical(root, pristine_dataset), f"{choice} on {target.name} was not caught"
        OUTCOMES["dataset"]["harmless"] += 1
    shutil.rmtree(root.parent)


@pytest.fixture(scope="module")
def pristine_checkpoint(tmp_path_factory, pristine_dataset) -> Path:
    """A real two-step run's checkpoint (model, distributed optimizer, scheduler, RNG,
    tokenizer)."""
    from multiproc import run_ranks

    run = tmp_path_factory.mktemp("ckpt") / "run"
    run_ranks(_train_two_steps, 1, str(pristine_dataset), str(run))
    return run / "checkpoints"


def _train_two_steps(rank: int, world: int, dataset: str, out_dir: str) -> None:
    from slowqk.config import load_recipe
    from slowqk.train import train

    train(
        load_recipe(
            "tiny/gpt",
            [
                "data.corpus=null",
                f"data.dataset={dataset}",
                f"out_dir={out_dir}",
                "train.steps=2",
                "train.save_interval=2",
                "model.num_layers=2",
                "model.seq_length=32",
                "train.tensorboard=false",
            ],
        ),
        quiet=True,
    )


@SETTINGS
@given(DAMAGE)
def test_damaged_checkpoint_is_never_loaded(pristine_checkpoint, tmp_path_factory, choice) -> None:
    from slowqk.checkpoint import CheckpointError, latest_checkpoint

    root = tmp_path_factory.mktemp("ck") / "checkpoints"
    shutil.copytree(pristine_checkpoint, root)
    target = damage(root, choice)
    try:
        found = latest_checkpoint(root)
    except CheckpointError as exc:
        msg = str(exc)
        assert "\n" not in msg and str(root) in msg, msg
        OUTCOMES["checkpoint"]["refused"] += 1
    else:
        OUTCOMES["checkpoint"]["harmless"] += 1
        # what a run would load is byte-identical to what was saved (damage to the `latest`
        # pointer alone only changes which complete checkpoint is found)
        assert found is not None and identical(found, pristine_checkpoint / found.name), (
            f"{choice} on {target.relative_to(root)} was not caught"
        )
    shutil.rmtree(root.parent)


def test_record_the_outcomes(fault_record) -> None:
    """Runs after the two properties above (file order): their counts go into the fault table."""
    for what, counts in OUTCOMES.items():
        total = sum(counts.values())
        assert total >= 150, f"the {what} property did not run"
        fault_record(
            f"random {what} damage",
            f"{total} random flips, truncations, appends, zero-fills, deletions of one {what} file",
            "refused in one line naming the file, or harmless (bytes unchanged)",
            f"{counts['refused']} refused, {counts['harmless']} harmless; no traceback, nothing "
            "damaged loaded",
        )
