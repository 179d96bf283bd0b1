"""DeepSpeed ZeRO 1-3 in the one training loop: its checkpoints carry the same integrity record and
fall back the same way, and a run killed (-9) mid-run and mid-save, or stopped by a signal,
resumes to bitwise the losses of an uninterrupted run; NaN steps are skipped without moving
anything (without gradient clipping too, where ZeRO computes no gradient norm)."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
from test_faults import _args, _losses, dataset, launch, terminate_after  # noqa: F401 - dataset is a fixture

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e .[deepspeed])")
pytestmark = pytest.mark.slow


def _zero_args(ds: str, run: Path, stage: int, **extra) -> list[str]:
    return _args(ds, run, **{"parallel.engine": "deepspeed", "parallel.zero_stage": stage, **extra})


def _damage(ckpt: Path) -> Path:
    """Overwrite 64 bytes in the middle of the largest DeepSpeed file, keeping its size."""
    victim = max((ckpt / "deepspeed").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    victim.write_bytes(bytes(data))
    return victim


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_killed_mid_run_and_mid_save_resumes_bitwise(
    dataset,  # noqa: F811 - the fixture imported above
    tmp_path,
    caplog,
    stage,
    fault_record,
) -> None:
    from slowqk.checkpoint import latest_checkpoint, verify_checkpoint

    ref = tmp_path / "ref"
    assert launch(_zero_args(dataset, ref, stage)) == [0, 0], launch.last[0].stderr_text[-3000:]
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["engine"] == f"deepspeed-zero{stage}"
    assert summary["qk_release"]["reason"] == "settled"

    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    codes = launch(_zero_args(dataset, run, stage), env={"SLOWQK_FAULT_KILL_AT_STEP": "5"})
    assert codes[0] == -signal.SIGKILL, launch.last[0].stderr_text[-3000:]
    assert (ckpts / "latest").read_text().strip() == "iter_0000004"
    codes = launch(_zero_args(dataset, run, stage), env={"SLOWQK_FAULT_KILL_IN_SAVE": "8"})
    assert codes[0] == -signal.SIGKILL, launch.last[0].stderr_text[-3000:]
    # killed after DeepSpeed wrote its files, before the record: never read, and removed later
    assert (ckpts / "iter_0000008.tmp" / "deepspeed").is_dir()
    assert (ckpts / "latest").read_text().strip() == "iter_0000006"
    verify_checkpoint(ckpts / "iter_0000006")
    victim = _damage(ckpts / "iter_0000006")  # the newest good one, damaged: fall back to 4
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(ckpts).name == "iter_0000004"
    assert victim.name in caplog.text

    assert launch(_zero_args(dataset, run, stage)) == [0, 0], launch.last[0].stderr_text[-3000:]
    assert not (ckpts / "iter_0000008.tmp").exists()
    got = _losses(run)
    assert got == _losses(ref)  # loss, val loss, multipliers and drift of every step, bitwise
    assert json.loads((run / "summary.json").read_text())["qk_release"] == summary["qk_release"]
    fault_record(
        f"DeepSpeed ZeRO-{stage}: kill -9 mid-run and mid-save",
        "SIGKILL of rank 0 (of 2) after step 5; again while writing step 8; step 6's largest "
        "DeepSpeed file then damaged",
        "each resume from the newest good checkpoint; losses bitwise equal to an uninterrupted run",
        f"resumed from 4, then 4 again (6 damaged, 8 unfinished); {len(got)} steps bitwise equal",
    )


def test_zero3_stop_signal_exits_75_and_nan_steps_move_nothing(
    dataset,  # noqa: F811 - the fixture imported above
    tmp_path,
    fault_record,
) -> None:
    steps = 40
    ref = tmp_path / "ref"
    args = {"train.steps": steps, "train.save_interval": 20}
    assert launch(_zero_args(dataset, ref, 3, **args)) == [0, 0], launch.last[0].stderr_text[-3000:]
    run = tmp_path / "run"
    codes = launch(_zero_args(dataset, run, 3, **args), on_start=terminate_after(run, 5))
    assert codes == [75, 75], (codes, launch.last[0].stderr_text[-2000:])
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 5 <= stopped_at < steps
    assert launch(_zero_args(dataset, run, 3, **args)) == [0, 0]
    assert _losses(run) == _losses(ref)

    nan = tmp_path / "nan"
    env = {"SLOWQK_FAULT_NAN_AT_STEPS": "3"}
    no_clip = {"train.steps": 8, "optimizer.clip_grad": 0.0}  # ZeRO computes no norm then
    assert launch(_zero_args(dataset, nan, 3, **no_clip), env=env) == [0, 0]
    lines = (nan / "metrics.jsonl").read_text().splitlines()
    recs = {r["step"]: r for r in map(json.loads, lines)}
    assert json.loads((nan / "summary.json").read_text())["skipped_steps"] == 1
    assert recs[4]["skipped"] and not recs[5]["skipped"]
    assert recs[4]["lr"] == recs[5]["lr"]  # a skipped step does not advance the LR schedule
    assert all(math.isfinite(recs[s]["loss"]) for s in range(5, 9))  # no NaN reached the weights
    fault_record(
        "DeepSpeed ZeRO-3: SIGTERM and NaN",
        f"SIGTERM to both ranks mid-run (stopped after step {stopped_at}); a NaN loss at step 3",
        "checkpoint, exit 75, resume exact; the NaN step skipped, nothing moved",
        f"exit codes 75/75; {steps}/{steps} steps bitwise equal; 1 skip, LR held, losses finite",
    )


def test_what_a_deepspeed_checkpoint_cannot_do_is_refused_in_one_line(
    dataset,  # noqa: F811 - the fixture imported above
    tmp_path,
) -> None:
    from multiproc import run_cli

    run = tmp_path / "ds"
    assert launch(_zero_args(dataset, run, 2, **{"train.steps": 2}), nproc=1) == [0]
    for args, message in (
        (
            _args(dataset, run, **{"train.steps": 4}),
            "written by the deepspeed engine, this run uses parallel.engine=megatron",
        ),
        (
            _zero_args(dataset, run, 3, **{"train.steps": 4}),
            "a ZeRO-2 checkpoint at data-parallel size 1; this run is ZeRO-3 at 1",
        ),
        (
            _args(dataset, tmp_path / "other", **{"train.init_from": str(run)}),
            "is a DeepSpeed checkpoint; train.init_from reads megatron-core checkpoints",
        ),
    ):
        assert launch(args, nproc=1) == [2], message
        err = launch.last[0].stderr_text
        assert message in err and "Traceback" not in err, err[-2000:]
    proc = run_cli(["export-hf", str(run), str(tmp_path / "hf")])
    assert proc.returncode == 2 and "is a DeepSpeed checkpoint; export-hf reads" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
