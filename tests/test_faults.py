"""Fault tolerance, through real multi-process `slowqk train` runs: kill -9 at random steps, a kill
while saving, stop signals, non-finite steps, recipe changes on resume, corrupt checkpoints."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import SHARED
from multiproc import CliProcess, _free_port

CORPUS = SHARED / "data" / "tinyshakespeare" / "input.txt"
STEPS = 12
# The adaptive release (qk.release=adaptive): the lower layers' drift settles at step 6 in these
# runs, so the slowdown holds for steps 0-5 and ramps over 6-9; kills land before, in and after it.
RELEASE, RAMP = 6, 4
# two learning-rate groups beside it, whose own schedules the kills also land inside
GROUPS = (
    "[{params: [v, o], layers: {indices: [0, 1]}, mult: 0.5, unit: steps, hold: 3, ramp: 4},"
    " {params: [embedding, fc2], mult: 0.3, unit: steps, hold: 7, ramp: 3}]"
)
FAILURE_GRACE_S = 120  # how long the other ranks get to exit by themselves once one has failed


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from slowqk.data.corpus import prepare_corpus

    root = tmp_path_factory.mktemp("data")
    small = root / "corpus.txt"
    small.write_text("".join(CORPUS.read_text().splitlines(keepends=True)[:3000]))
    return str(prepare_corpus(small, root / "prepared", vocab_size=384).dataset_dir)


def _args(dataset: str, run_dir: Path, **extra) -> list[str]:
    base = {
        "out_dir": str(run_dir),
        "data.corpus": "null",
        "data.dataset": dataset,
        "model.num_layers": 4,
        "model.hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.seq_length": 32,
        "train.steps": STEPS,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 8,
        "train.log_interval": 1,
        "train.eval_interval": 6,
        "train.eval_iters": 1,
        "train.save_interval": 2,
        "train.keep_last": 3,
        "train.progress_bar": "false",
        "train.tensorboard": "false",
        "optimizer.warmup_steps": 2,
        "qk.enabled": "true",
        "qk.unit": "steps",
        "qk.ramp": RAMP,
        "qk.release": "adaptive",
        "qk.adaptive.min_hold": 2,
        "qk.adaptive.max_hold": 8,
        "qk.adaptive.threshold": 0.6,
        "lr_groups": GROUPS,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(
    args: list[str],
    nproc: int = 2,
    env: dict | None = None,
    flags: list[str] | None = None,
    on_start=None,
    timeout: float = 300,
) -> list[int]:
    """Run `slowqk train` as ``nproc`` ranks (torchrun-style env), each its own process forked with
    the imports done. When one rank dies, the others are killed, as torchrun does. Returns the exit
    codes (negative: killed by that signal)."""
    port = _free_port()
    procs = []
    logs = tempfile.mkdtemp(prefix="ranks")
    for rank in range(nproc):
        e = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        procs.append(
            CliProcess(
                ["train", "tiny/gpt", *args, "--quiet", *(flags or [])], e, f"{logs}/rank{rank}.err"
            )
        )
    if on_start is not None:
        on_start(procs)
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        codes = [p.poll() for p in procs]
        if any(c is not None and c < 0 for c in codes):
            deadline = 0.0  # a rank was killed by a signal: stop the others, as torchrun does
        elif any(c not in (None, 0, 75) for c in codes):
            # a rank exited with an error: the others are expected to exit by themselves with the
            # same verdict; give them as long as a loaded machine needs, never a fixed second
            deadline = min(deadline, time.time() + FAILURE_GRACE_S)
        if time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    for rank, p in enumerate(procs):
        p.stderr_text = Path(logs, f"rank{rank}.err").read_text()
    shutil.rmtree(logs)
    launch.last = procs
    return [p.returncode for p in procs]


def terminate_after(run: Path, lines: int):
    """An ``on_start`` for :func:`launch`: SIGTERM to every rank (as SLURM or torchrun forward
    it) once the run has logged ``lines`` steps."""

    def on_start(procs) -> None:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
                break
            time.sleep(0.02)
        for p in procs:
            p.send_signal(signal.SIGTERM)

    return on_start


def _losses(run_dir: Path) -> dict[int, tuple]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = (
            r["loss"],
            r.get("val_loss"),
            r["mult_q"],
            r.get("lr_mult"),
            r.get("lower_drift"),
            r.get("lower_drift_ratio"),
        )
    return out


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> dict[int, tuple]:
    run = tmp_path_factory.mktemp("ref") / "run"
    assert launch(_args(dataset, run)) == [0, 0], launch.last[0].stderr_text[-2000:]
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    release = json.loads((run / "summary.json").read_text())["qk_release"]
    assert (release["step"], release["reason"]) == (RELEASE, "settled"), release
    mults = [losses[s][3] for s in sorted(losses)]  # each group's hold, ramp and release, by name
    assert [m["v+o@0-1"] for m in mults[:4]] == [0.5, 0.5, 0.5, 0.6] and mults[7][
        "v+o@0-1"
    ] == 1.0, mults
    assert (
        mults[6]["embedding+fc2"] == 0.3
        and mults[7]["embedding+fc2"] < 1.0 == mults[10]["embedding+fc2"]
    ), mults
    return losses


@pytest.mark.slow
def test_kill9_at_random_steps_resumes_bitwise(dataset, reference, tmp_path, fault_record) -> None:
    rng = random.Random(2026)
    kills = sorted(rng.sample(range(1, STEPS), 5))
    # before the release was decided, during the ramp, after it
    assert any(k < RELEASE for k in kills) and any(RELEASE <= k < RELEASE + RAMP for k in kills)
    assert any(k >= RELEASE + RAMP for k in kills)
    run = tmp_path / "run"
    for k in kills:
        codes = launch(_args(dataset, run), env={"SLOWQK_FAULT_KILL_AT_STEP": str(k)})
        assert codes[0] == -signal.SIGKILL, (k, codes, launch.last[0].stderr_text[-2000:])
    assert launch(_args(dataset, run)) == [0, 0], launch.last[0].stderr_text[-2000:]
    got = _losses(run)
    assert (
        got == reference
    )  # train and validation loss, Q multiplier and drift signal of every step, bitwise
    summary = json.loads((run / "summary.json").read_text())["qk_release"]
    assert (summary["step"], summary["reason"]) == (RELEASE, "settled")
    fault_record(
        "kill -9 during training",
        f"SIGKILL of rank 0 (of 2) after steps {kills}, each run resumed; "
        f"adaptive Q/K release decided at step {RELEASE}",
        "losses after resume bitwise equal to an uninterrupted run; the release decided as in it",
        f"{len(got)}/{STEPS} steps bitwise equal (train and validation loss, multiplier, drift "
        f"signal); released at step {RELEASE} as uninterrupted",
    )


@pytest.mark.slow
def test_kill_during_checkpoint_save_falls_back(dataset, reference, tmp_path, fault_record) -> None:
    from slowqk.checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint

    run = tmp_path / "run"
    codes = launch(_args(dataset, run), env={"SLOWQK_FAULT_KILL_IN_SAVE": "4"})
    assert codes[0] == -signal.SIGKILL
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    assert not (ckpts / "iter_0000004").exists() and (ckpts / "iter_0000004.tmp").is_dir()
    with pytest.raises(CheckpointError, match="save did not finish"):
        verify_checkpoint(ckpts / "iter_0000004.tmp")
    assert latest_checkpoint(ckpts).name == "iter_0000002"
    assert launch(_args(dataset, run)) == [0, 0]
    assert _losses(run) == reference
    assert not list(ckpts.glob("*.tmp"))  # leftovers of the interrupted save are cleaned up
    fault_record(
        "kill -9 inside a checkpoint save",
        "SIGKILL after the shards of step 4 were written",
        "latest stays at step 2; the partial save never looks complete; resume exact",
        "latest = iter_0000002; iter_0000004.tmp rejected; losses bitwise equal",
    )


# every scale knob at once on four ranks: TP2 x PP2 with two virtual stages per rank, sequence
# parallelism, both overlaps, selective recomputation (virtual stages need untied embeddings)
ALL_KNOBS = {
    "parallel.tensor": 2,
    "parallel.pipeline": 2,
    "parallel.virtual_pipeline": 2,
    "parallel.sequence_parallel": "true",
    "parallel.overlap_grad_reduce": "true",
    "parallel.overlap_param_gather": "true",
    "train.recompute.granularity": "selective",
    "model.tie_embeddings": "false",
}


@pytest.mark.slow
def test_kills_with_every_scale_knob_on_resume_bitwise(dataset, tmp_path, fault_record) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert launch(_args(dataset, ref, **ALL_KNOBS), nproc=4) == [0] * 4, launch.last[0].stderr_text[
        -2000:
    ]
    codes = launch(
        _args(dataset, run, **ALL_KNOBS), nproc=4, env={"SLOWQK_FAULT_KILL_IN_SAVE": "4"}
    )
    assert codes[0] == -signal.SIGKILL, (codes, launch.last[0].stderr_text[-2000:])
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    codes = launch(
        _args(dataset, run, **ALL_KNOBS), nproc=4, env={"SLOWQK_FAULT_KILL_AT_STEP": "7"}
    )
    assert codes[0] == -signal.SIGKILL, (codes, launch.last[0].stderr_text[-2000:])
    assert launch(_args(dataset, run, **ALL_KNOBS), nproc=4) == [0] * 4
    expected, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected
    fault_record(
        "kill -9 with every scale knob on",
        "TP2 x PP2 x 2 virtual stages, sequence parallelism, both overlaps, selective "
        "recomputation (4 ranks): SIGKILL inside the save of step 4, then after step 7",
        "resume falls back to step 2, then to step 6; losses equal to an uninterrupted run",
        f"{len(got)}/{STEPS} steps bitwise equal (train and validation loss, multipliers, drift)",
    )


class _Descendants:
    """Every process started under the given ranks while they run, seen by polling (a helper
    outlives its rank only if it is still there once the ranks are gone)."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}  # pid -> create time (a pid can be reused)
        self._stop = threading.Event()

    def watch(self, procs) -> None:
        def poll() -> None:
            while not self._stop.is_set():
                for p in procs:
                    try:
                        for child in psutil.Process(p.pid).children(recursive=True):
                            self.seen.setdefault(child.pid, child.create_time())
                    except psutil.Error:
                        pass
                time.sleep(0.05)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def alive(self) -> list[str]:
        out = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid}: {' '.join(proc.cmdline())[:120]}")
            except psutil.Error:
                pass
        return out


@pytest.mark.slow
def test_a_killed_rank_leaves_no_process_behind(dataset, tmp_path, fault_record) -> None:
    """megatron-core's checkpoint writer starts a helper process per rank on the first save (a
    spawned multiprocessing manager); ranks killed with -9 after two saves must take it with
    them."""
    watcher = _Descendants()
    codes = launch(
        _args(dataset, tmp_path / "run"),
        env={"SLOWQK_FAULT_KILL_AT_STEP": "5"},
        on_start=watcher.watch,
    )
    watcher.stop()
    assert codes[0] == -signal.SIGKILL, launch.last[0].stderr_text[-2000:]
    assert watcher.seen, "no helper process was seen: the test would pass without looking"
    deadline = (
        time.time() + 60
    )  # the kernel delivers the parent-death signal; give a loaded machine time
    while watcher.alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not watcher.alive(), watcher.alive()
    fault_record(
        "helpers of killed ranks",
        "SIGKILL of both ranks after two checkpoint saves",
        "no process the ranks started outlives them",
        f"{len(watcher.seen)} helper processes seen, none left",
    )


def test_corrupt_newest_checkpoint_falls_back_with_warning(
    dataset, tmp_path, caplog, fault_record
) -> None:
    from slowqk.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    assert launch(_args(dataset, run, **{"train.steps": 6}), nproc=1) == [0]
    ckpts = run / "checkpoints"
    newest = ckpts / "iter_0000006"
    victim = max(
        (p for p in newest.rglob("*") if p.is_file() and p.name.endswith(".distcp")),
        key=lambda p: p.stat().st_size,
    )
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(ckpts).name == "iter_0000004"
    assert "truncated" in caplog.text
    (ckpts / "iter_0000004" / "slowqk_checkpoint.json").write_text("{}")
    assert latest_checkpoint(ckpts).name == "iter_0000002"
    fault_record(
        "corrupt checkpoints",
        "newest shard file truncated; then the next one's record altered",
        "fall back to the newest good checkpoint, with a warning",
        "iter_6 -> iter_4 -> iter_2, warnings name the file",
    )


def _damage_in_place(path: Path, offset_fraction: float = 0.5) -> None:
    """Overwrite 64 bytes in the middle of a file, keeping its size (what a size check misses)."""
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_fraction)
    data[at : at + 64] = bytes((b + 1) % 256 for b in data[at : at + 64])
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damaged_content_is_never_trained_on(dataset, reference, tmp_path, fault_record) -> None:
    """In-place damage of the largest shard of the newest checkpoint and of the pickled common state
    of the next one: both are caught by content hashes; the run resumes from the newest good
    checkpoint with one warning line naming both files, and trains bitwise as if nothing
    happened."""
    run = tmp_path / "run"
    assert launch(_args(dataset, run)) == [0, 0], launch.last[0].stderr_text[-2000:]
    ckpts = run / "checkpoints"
    record = json.loads((ckpts / "iter_0000012" / "slowqk_checkpoint.json").read_text())
    assert all(info["sha256"] for info in record["files"].values())  # every file, whatever its size
    shard = max(
        (p for p in (ckpts / "iter_0000012").glob("*.distcp")), key=lambda p: p.stat().st_size
    )
    _damage_in_place(shard)
    _damage_in_place(ckpts / "iter_0000010" / "common.pt", 0.3)
    (ckpts / "latest").write_text("iter_0000012\n")
    assert launch(_args(dataset, run)) == [0, 0], launch.last[0].stderr_text[-2000:]
    log = launch.last[0].stderr_text
    warnings = [line for line in log.splitlines() if "an older checkpoint" in line]
    assert len(warnings) == 1 and shard.name in warnings[0] and "common.pt" in warnings[0], log[
        -2000:
    ]
    assert "Traceback" not in log and "Unpickling" not in log
    assert (
        _losses(run) == reference
    )  # steps 9-12 retrained from iter_8: bitwise the uninterrupted run
    fault_record(
        "damaged checkpoint content",
        f"64 bytes changed in place in {shard.name} (largest shard, newest "
        "checkpoint) and in the next one's common.pt (pickled state)",
        "both refused by sha256; resume from the newest good one; one warning line",
        "iter_12 and iter_10 skipped, resumed from iter_8, losses bitwise equal",
    )


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_75_then_resumes_exactly(
    dataset, tmp_path, fault_record
) -> None:
    steps = 60
    ref = tmp_path / "ref"
    assert launch(_args(dataset, ref, **{"train.steps": steps, "train.save_interval": 20})) == [
        0,
        0,
    ]
    run = tmp_path / "run"
    codes = launch(
        _args(dataset, run, **{"train.steps": steps, "train.save_interval": 20}),
        on_start=terminate_after(run, 5),
    )
    assert codes == [75, 75], (codes, launch.last[0].stderr_text[-2000:])
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 5 <= stopped_at < steps
    assert launch(_args(dataset, run, **{"train.steps": steps, "train.save_interval": 20})) == [
        0,
        0,
    ]
    assert _losses(run) == _losses(ref)
    fault_record(
        "SIGTERM (preemption)",
        f"SIGTERM to both ranks mid-run (stopped after step {stopped_at})",
        "finish the step, checkpoint, exit 75; resume exact",
        f"exit codes 75/75; {steps}/{steps} steps bitwise equal",
    )


def test_second_signal_exits_at_once(dataset, tmp_path, fault_record) -> None:
    run = tmp_path / "run"

    def double(procs):
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.02)
        procs[0].send_signal(signal.SIGTERM)
        time.sleep(0.05)  # the same signal sent twice at once is delivered once
        procs[0].send_signal(signal.SIGTERM)

    codes = launch(
        _args(dataset, run, **{"train.steps": 500, "train.save_interval": 100}),
        nproc=1,
        on_start=double,
    )
    assert codes == [76]
    assert not (run / "checkpoints" / "latest").exists()
    fault_record(
        "second signal",
        "two SIGTERMs in a row",
        "exit 76 at once, no checkpoint written",
        "exit 76",
    )


def test_nan_steps_are_skipped_then_stop_after_k(dataset, tmp_path, fault_record) -> None:
    run = tmp_path / "skip"
    assert launch(
        _args(dataset, run, **{"train.steps": 8}), nproc=2, env={"SLOWQK_FAULT_NAN_AT_STEPS": "3"}
    ) == [0, 0]
    summary = json.loads((run / "summary.json").read_text())
    recs = {
        json.loads(x)["step"]: json.loads(x)
        for x in (run / "metrics.jsonl").read_text().splitlines()
    }
    assert summary["skipped_steps"] == 1 and recs[4]["skipped"] and not recs[5]["skipped"]
    assert recs[4]["lr"] == recs[5]["lr"]  # a skipped step does not advance the LR schedule

    stop = tmp_path / "stop"
    codes = launch(
        _args(dataset, stop, **{"train.steps": 10, "train.max_consecutive_skips": 3}),
        nproc=2,
        env={"SLOWQK_FAULT_NAN_AT_STEPS": "4,5,6"},
    )
    assert codes[0] == 3, launch.last[0].stderr_text[-2000:]
    assert "non-finite" in launch.last[0].stderr_text
    assert (stop / "checkpoints" / "latest").read_text().strip() == "iter_0000006"

    first = tmp_path / "first"
    codes = launch(
        _args(dataset, first, **{"train.on_nonfinite": "stop"}),
        nproc=1,
        env={"SLOWQK_FAULT_NAN_AT_STEPS": "2"},
    )
    assert codes == [3]
    assert (first / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    fault_record(
        "non-finite loss",
        "NaN loss at step 3 (skip policy); at steps 4-6 with max_consecutive_skips=3; "
        "at step 2 with on_nonfinite=stop",
        "skip and count; stop with exit 3 keeping the last good checkpoint",
        "1 skip counted, LR held; exit 3 after 3 in a row; exit 3 at once with stop",
    )


def test_changed_recipe_is_refused_on_resume(dataset, tmp_path, fault_record) -> None:
    run = tmp_path / "run"
    assert launch(_args(dataset, run, **{"train.steps": 4}), nproc=1) == [0]
    codes = launch(_args(dataset, run, **{"train.steps": 6, "optimizer.lr": 0.01}), nproc=1)
    err = launch.last[0].stderr_text
    assert (
        codes == [2]
        and "optimizer.lr: 0.003 -> 0.01" in err
        and "train.steps: 4 -> 6" in err
        and "Traceback" not in err
    )
    assert launch(
        _args(dataset, run, **{"train.steps": 6, "train.log_interval": 2}),
        nproc=1,
        flags=["--allow-recipe-change"],
    ) == [0]
    assert "train.steps" in (run / "recipe_changes.jsonl").read_text()
    assert launch(_args(dataset, run, **{"train.steps": 6, "train.eval_interval": 3}), nproc=1) == [
        0
    ]  # harmless change
    fault_record(
        "changed recipe on resume",
        "optimizer.lr and train.steps changed",
        "refused naming the fields; allowed and logged with --allow-recipe-change",
        "exit 2 naming both; resumed and logged with the flag",
    )


def test_pickled_code_in_a_checkpoint_is_never_run(dataset, tmp_path, fault_record) -> None:
    """A checkpoint whose common state carries a pickled callable is refused, even with a valid
    record."""
    import pickle

    from slowqk.checkpoint import CheckpointError, latest_checkpoint, read_extra, write_record

    run = tmp_path / "run"
    assert launch(_args(dataset, run, **{"train.steps": 2}), nproc=1) == [0]
    ckpt = latest_checkpoint(run / "checkpoints")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "common.pt").write_bytes(pickle.dumps({"extra": Payload()}))
    write_record(
        ckpt, 2
    )  # an attacker can rewrite the record too: it is a checksum, not a signature
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_extra(ckpt)
    codes = launch(_args(dataset, run, **{"train.steps": 4}), nproc=1)
    assert codes == [2] and "refusing to load" in launch.last[0].stderr_text
    assert not marker.exists()
    fault_record(
        "pickled code in a checkpoint",
        "common.pt replaced by a pickle that runs a shell command",
        "refused; nothing executed",
        "CheckpointError, exit 2, no side effect",
    )


def test_content_of_files_of_any_size_is_verified(tmp_path, fault_record) -> None:
    """A 9 MiB shard damaged in place (same size) is caught: every file's sha256 is recorded."""
    from slowqk.checkpoint import CheckpointError, verify_checkpoint, write_record

    ckpt = tmp_path / "iter_0000002"
    ckpt.mkdir()
    (ckpt / "__0_0.distcp").write_bytes(os.urandom(9 << 20))
    (ckpt / "common.pt").write_bytes(os.urandom(1000))
    write_record(ckpt, 2)
    verify_checkpoint(ckpt)
    _damage_in_place(ckpt / "__0_0.distcp", 0.9)
    with pytest.raises(
        CheckpointError, match=r"__0_0\.distcp: content differs from the checkpoint record"
    ):
        verify_checkpoint(ckpt)
    fault_record(
        "damaged large shard",
        "64 bytes changed in place in a 9 MiB shard",
        "refused (sha256)",
        "CheckpointError naming the file",
    )


def _one_line_refusal(codes: list[int]) -> str:
    err = launch.last[0].stderr_text
    errors = [line for line in err.splitlines() if line.startswith(("error:", "recipe error:"))]
    assert codes == [2] and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


def test_bad_data_and_output_are_refused_before_any_work(dataset, tmp_path, fault_record) -> None:
    """A truncated shard, a binary corpus, an out_dir under a regular file: one line naming the
    file and what was expected, nothing written."""
    broken = tmp_path / "truncated"
    shutil.copytree(dataset, broken)
    shard = sorted((broken / "train").glob("*.bin"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    run = tmp_path / "run"
    line = _one_line_refusal(launch(_args(str(broken), run), nproc=1))
    assert str(shard) in line and "truncated?" in line and not run.exists()
    fault_record(
        "truncated shard",
        f"{shard.name} cut to half its size",
        "one line naming the file, nothing written",
        line.split(": ", 2)[-1],
    )

    corpus = tmp_path / "binary.txt"
    corpus.write_bytes(b"\x94\x00\xff\xfe" + os.urandom(64))
    line = _one_line_refusal(
        launch([*_args(dataset, run), "data.dataset=null", f"data.corpus={corpus}"], nproc=1)
    )
    assert str(corpus) in line and "not valid UTF-8" in line and not run.exists()
    fault_record(
        "binary corpus",
        "data.corpus is not text",
        "one line naming the file, nothing written",
        line.split(": ", 2)[-1],
    )

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _one_line_refusal(launch(_args(dataset, blocker / "run"), nproc=1))
    assert f"out_dir={blocker / 'run'}" in line and "is a file" in line
    fault_record(
        "out_dir under a file",
        "out_dir=<regular file>/run",
        "one line, no traceback",
        line.split(": ", 1)[-1].replace(str(tmp_path), "<tmp>"),
    )


def test_bad_recipe_values_are_refused_when_the_recipe_loads(
    dataset, tmp_path, capsys, fault_record
) -> None:
    """`train` refuses what `print-recipe` refuses, in one line naming the key, before any data work
    (one real `slowqk train` process; the other values through the same entry point in-process)."""
    from slowqk.cli import main

    run = tmp_path / "run"
    line = _one_line_refusal(launch([*_args(dataset, run), "qk.layers={top: 99}"], nproc=1))
    assert "key 'qk.layers'" in line and not run.exists()
    fault_record(
        "bad recipe value",
        "qk.layers={top: 99} (4 layers)",
        "refused at load, one line naming the key",
        line.split("key ", 1)[-1],
    )
    for overrides, key in (
        (["qk.layers={indices: [9]}"], "qk.layers"),
        (["qk.release=fixed", "qk.hold=2.5"], "qk.hold"),
        (["qk.release=fixed", "qk.unit=fraction", "qk.hold=1.5"], "qk.hold"),
        (["qk.adaptive.max_hold=2.5"], "qk.adaptive.max_hold"),
        (["parallel.tensor=3"], "parallel.tensor"),
    ):
        assert main(["train", "tiny/gpt", *_args(dataset, run), *overrides]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"key '{key}'" in err and not run.exists(), err
        shown = " ".join(overrides) + (" (qk.unit=steps)" if "=2.5" in overrides[-1] else "")
        fault_record(
            "bad recipe value",
            shown,
            "refused at load, one line naming the key",
            err.strip().split("key ", 1)[-1],
        )


@pytest.mark.slow
def test_a_hung_rank_stops_the_others_within_the_timeout(dataset, tmp_path, fault_record) -> None:
    """Rank 1 is stopped with SIGSTOP after step 3 (a checkpoint at step 2 exists): rank 0 gives up
    after train.dist_timeout with one line naming the timeout and the step, exit 4."""
    import threading

    from slowqk.checkpoint import verify_checkpoint

    timeout, margin = 8, 30  # the margin: a loaded 2-core machine, and the step in flight
    run = tmp_path / "run"
    seen: dict[str, float] = {}

    def stop_rank1_after_step3(procs) -> None:
        def watch() -> None:
            metrics = run / "metrics.jsonl"
            while procs[0].poll() is None:
                steps = (
                    [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
                    if metrics.is_file()
                    else []
                )
                if "stopped" not in seen and steps and max(steps) >= 3:
                    procs[1].send_signal(signal.SIGSTOP)
                    seen["stopped"] = time.time()
                time.sleep(0.05)
            seen["rank0_exit"] = time.time()
            procs[1].kill()  # the stopped rank never exits by itself (a launcher would kill it too)

        threading.Thread(target=watch, daemon=True).start()

    codes = launch(
        _args(dataset, run, **{"train.steps": 200, "train.dist_timeout": timeout}),
        on_start=stop_rank1_after_step3,
    )
    err = launch.last[0].stderr_text
    assert codes[0] == 4, (codes, err[-2000:])
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"train.dist_timeout={timeout} s at step " in lines[0], lines
    waited = seen["rank0_exit"] - seen["stopped"]
    assert timeout <= waited + 1 and waited < timeout + margin, waited
    latest = (run / "checkpoints" / "latest").read_text().strip()
    verify_checkpoint(run / "checkpoints" / latest)  # what was written before the hang is intact
    fault_record(
        "hung rank",
        f"SIGSTOP of rank 1 (of 2) after step 3, train.dist_timeout={timeout} s",
        "rank 0 stops within the timeout plus a margin, one line, non-zero exit; checkpoints "
        "intact",
        f"rank 0 exited with 4 after {waited:.1f} s: {lines[0][:120]}; {latest} verified",
    )


@pytest.mark.slow
def test_a_rank_that_never_comes_is_one_line_within_the_timeout(dataset, tmp_path) -> None:
    """train.dist_timeout reaches process-group creation: rank 0 of 2 waits that long, no longer."""
    start = time.time()
    codes = launch(
        _args(dataset, tmp_path / "run", **{"train.dist_timeout": 5}),
        nproc=1,
        env={"WORLD_SIZE": "2"},
    )
    waited = time.time() - start
    err = launch.last[0].stderr_text
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert codes == [4] and len(lines) == 1 and "Traceback" not in err, (codes, err[-2000:])
    assert "train.dist_timeout=5 s while starting" in lines[0], lines
    assert waited + 1 >= 5 and waited < 5 + 30, waited
