"""Checkpoints written by older commits resume on this one to the losses the older commits got.

``tests/fixtures/resume_before_callbacks`` holds a run killed (-9) right after its step-4
checkpoint, made on commit f1d9e07 (before the training loop was rebuilt around engines and
callbacks), with the adaptive Q/K release, diagnostics and a learning-rate group; ``expected.json``
has what the uninterrupted run logged on that commit; ``tests/fixtures/resume_every_callback``
the same with every callback's state, made on d36f473. Numbers recorded on another machine are
compared within 1e-5 (a vector unit of another width rounds sums differently: bitwise holds per
machine), decisions exactly, and runs on this machine with each other bitwise. A lost or
misread state shows as another release or loss far beyond the tolerance."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from multiproc import run_cli

from slowqk.checkpoint import read_extra

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "resume_before_callbacks"


def _train(work: Path, out: str, *extra: str, env: dict | None = None):
    overrides = (work / "overrides.txt").read_text().splitlines()
    argv = ["train", "tiny/gpt", f"out_dir={out}", *overrides, *extra, "--quiet"]
    return run_cli(argv, cwd=work, env=env)


def _resumed_through_this_code(fixture: Path, work: Path, step: int) -> tuple[dict, dict]:
    """The fixture's run resumed, killed (-9) after the checkpoint this code writes at ``step``,
    and resumed again: the losses logged after ``step``, and the summary."""
    shutil.copytree(fixture, work)
    env = {"SLOWQK_FAULT_KILL_AT_STEP": str(step)}
    killed = _train(work, "run", f"train.save_interval={step}", env=env)
    assert killed.returncode != 0
    resumed = _train(work, "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = {k: v for k, v in _losses(work / "run").items() if int(k) > step}
    return losses, json.loads((work / "run" / "summary.json").read_text())


def _losses(run: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {str(r["step"]): r["loss"] for r in rows}


def test_a_checkpoint_from_before_the_callbacks_resumes_bitwise(tmp_path) -> None:
    """Resumed straight, the old commit's step-4 checkpoint gives the losses the old commit logged
    (bitwise on the machine that recorded them; another machine's vector unit rounds sums
    differently, so within 1e-5 there) and its decisions exactly; resumed again through a
    checkpoint this code writes at step 6 after a kill -9, the same numbers bitwise."""
    work = tmp_path / "fixture"
    shutil.copytree(FIXTURE, work)
    proc = _train(work, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads((work / "expected.json").read_text())
    run = work / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] is True
    losses = _losses(run)
    # steps 5-8 trained here; 1-4 were dropped with the fixture's metrics (not part of it)
    for k in ("5", "6", "7", "8"):
        assert math.isclose(losses[k], expected["losses"][k], rel_tol=1e-5), k
    assert math.isclose(summary["final_val_loss"], expected["final_val_loss"], rel_tol=1e-5)
    release, want = summary["qk_release"], expected["qk_release"]
    exact = {k for k in want if k not in ("drift_ratio", "why")}
    assert {k: release[k] for k in exact} == {k: want[k] for k in exact}
    assert math.isclose(release["drift_ratio"], want["drift_ratio"], rel_tol=1e-5)
    diag = [json.loads(x) for x in (run / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in diag] == [5, 7]
    assert sorted(diag[0]["layers"]["0"]) == expected["diagnostics_layer_keys"]
    for d in diag:
        got, recorded = d["layers"]["1"]["entropy"], expected["entropy"][str(d["step"])]
        assert math.isclose(got, recorded, rel_tol=1e-5)

    # the same machine: through a checkpoint of this code, bitwise
    losses_again, summary_again = _resumed_through_this_code(FIXTURE, tmp_path / "again", 6)
    assert losses_again == {k: losses[k] for k in ("7", "8")}
    for key in ("final_val_loss", "qk_release"):
        assert summary_again[key] == summary[key], key


EVERY_CALLBACK = Path(__file__).resolve().parent / "fixtures" / "resume_every_callback"


def test_a_checkpoint_with_every_callback_resumes_bitwise(tmp_path) -> None:
    """The fixture's step-6 checkpoint (made on d36f473, every callback's state as flat keys)
    resumes: straight to step 12, and through a checkpoint this code writes at step 8 after a
    kill -9, to the same losses and decisions, bitwise; the states it carried (the warning's
    baselines, the drift tracker's peak) are the old checkpoint's exactly. The adaptive release at
    step 9 needs the tracker's peak from steps 1-6: a state lost on resume shows as another
    release."""
    work = tmp_path / "fixture"
    shutil.copytree(EVERY_CALLBACK, work)
    straight = _train(work, "run")
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = json.loads((work / "expected.json").read_text())
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["resumed"] is True
    losses = _losses(work / "run")
    later = [str(s) for s in range(7, 13)]
    release = summary["qk_release"]
    assert (release["step"], release["reason"], release["settled_at"]) == (9, "settled", 9)
    assert summary["specialization_warning"] == expected["specialization_warning"]
    # what the old code logged uninterrupted, on the machine that made the fixture (bitwise
    # there); another machine's vector unit rounds sums differently, hence the tolerance. The
    # bitwise check on any machine is the second resume below.
    for k in later:
        assert math.isclose(losses[k], expected["losses"][k], rel_tol=1e-5), k
    assert math.isclose(summary["final_val_loss"], expected["final_val_loss"], rel_tol=1e-5)

    # the same resume, killed (-9) after a checkpoint this code writes, resumed again
    again = tmp_path / "again"
    losses_again, summary_again = _resumed_through_this_code(EVERY_CALLBACK, again, 8)
    old = read_extra(again / "run" / "checkpoints" / "iter_0000006")
    new = read_extra(again / "run" / "checkpoints" / "iter_0000008")
    # this code keeps each callback's state under its name, none of it flat
    assert {"qk_release", "specialization_warning"} <= set(old)
    assert not {"qk_release", "specialization_warning", "drift_tracker"} & set(new)
    assert set(new["callbacks"]) == {"lower_drift", "diagnostics"}
    warning = new["callbacks"]["diagnostics"]["specialization_warning"]
    assert warning == old["specialization_warning"]  # set at the first probe, carried since
    tracker = new["callbacks"]["lower_drift"]["release"]["tracker"]
    assert tracker["peak"] == old["qk_release"]["tracker"]["peak"]  # the peak of step 1
    assert tracker["count"] == 8
    assert losses_again == {k: losses[k] for k in ("9", "10", "11", "12")}
    for key in ("final_val_loss", "qk_release", "specialization_warning"):
        assert summary_again[key] == summary[key], key
