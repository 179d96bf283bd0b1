"""A checkpoint written by an older commit resumes on this one to the losses the older commit got.

``tests/fixtures/resume_before_callbacks`` holds a run killed (-9) right after its step-4
checkpoint, made on commit f1d9e07 (before the training loop was rebuilt around engines and
callbacks), with the adaptive Q/K release, diagnostics and a learning-rate group; ``expected.json``
has what the uninterrupted run logged on that commit. Any change to checkpoint keys, decision
state or the order of work in a step shows here as a different loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from multiproc import run_cli

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "resume_before_callbacks"


def test_a_checkpoint_from_before_the_callbacks_resumes_bitwise(tmp_path) -> None:
    work = tmp_path / "fixture"
    shutil.copytree(FIXTURE, work)
    overrides = (work / "overrides.txt").read_text().splitlines()
    proc = run_cli(["train", "tiny/gpt", "out_dir=run", *overrides, "--quiet"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads((work / "expected.json").read_text())
    run = work / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] is True
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {str(r["step"]): r["loss"] for r in rows}
    # steps 5-8 trained here; 1-4 were dropped with the fixture's metrics (not part of it)
    assert {k: losses[k] for k in ("5", "6", "7", "8")} == {
        k: expected["losses"][k] for k in ("5", "6", "7", "8")
    }
    assert summary["final_val_loss"] == expected["final_val_loss"]
    assert summary["qk_release"] == expected["qk_release"]
    diag = [json.loads(x) for x in (run / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in diag] == [5, 7]
    assert sorted(diag[0]["layers"]["0"]) == expected["diagnostics_layer_keys"]
    assert {str(d["step"]): d["layers"]["1"]["entropy"] for d in diag} == {
        k: expected["entropy"][k] for k in ("5", "7")
    }
