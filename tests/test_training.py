"""End-to-end training through the real loop: checkpoint round trip, PP=2 vs PP=1, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED
from multiproc import run_ranks

CORPUS = SHARED / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> dict:
    """A sharded dataset (tokenizer inside) from the first 4000 lines of tiny Shakespeare."""
    from slowqk.data.corpus import prepare_corpus

    root = tmp_path_factory.mktemp("data")
    small = root / "corpus.txt"
    small.write_text("".join(CORPUS.read_text().splitlines(keepends=True)[:4000]))
    p = prepare_corpus(small, root / "prepared", vocab_size=512)
    return {"dataset": str(p.dataset_dir)}


def _overrides(prepared: dict, run_dir: Path, **extra: str) -> list[str]:
    base = {
        "out_dir": str(run_dir),
        "data.corpus": "null",
        "data.dataset": prepared["dataset"],
        "model.num_layers": "4",
        "model.hidden_size": "64",
        "model.num_attention_heads": "4",
        "model.seq_length": "32",
        "train.steps": "6",
        "train.micro_batch_size": "2",
        "train.global_batch_size": "8",
        "train.log_interval": "1",
        "train.eval_interval": "3",
        "train.eval_iters": "1",
        "train.save_interval": "2",
        "train.keep_last": "5",
        "train.progress_bar": "false",
        "train.tensorboard": "false",
        "optimizer.warmup_steps": "2",
        # the intervention is mid-hold at the checkpoint (step 2) and ramps across step 4
        "qk.enabled": "true",
        "qk.unit": "steps",
        "qk.hold": "3",
        "qk.ramp": "2",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train_worker(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    return train(load_recipe("tiny/gpt", overrides), quiet=True)


def _losses(run_dir: Path) -> dict[int, float]:
    from slowqk.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def _records(run_dir: Path) -> list[dict]:
    from slowqk.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def _resume_copy(src: Path, dst: Path, step: int) -> None:
    """A run directory whose newest checkpoint is ``src``'s checkpoint at ``step``."""
    name = f"iter_{step:07d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name + "\n")


@pytest.mark.slow
def test_resume_is_exact_and_pp2_matches_pp1(prepared, tmp_path) -> None:
    full = tmp_path / "full"
    summary = run_ranks(_train_worker, 2, _overrides(prepared, full))[
        0
    ]  # DP=2, distributed optimizer
    assert summary["steps"] == 6 and summary["qk_enabled"]
    reference = _losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert reference[6] < reference[1]

    # same layout, resumed from the step-2 checkpoint: bitwise the same losses
    resumed = tmp_path / "resumed"
    _resume_copy(full, resumed, 2)
    assert run_ranks(_train_worker, 2, _overrides(prepared, resumed))[0]["resumed"]
    got = _losses(resumed)
    assert sorted(got) == [3, 4, 5, 6]
    assert all(got[s] == reference[s] for s in got), (got, reference)

    # pipeline parallel 2 (DP=1), resharded from the DP=2 checkpoint: same losses to tolerance
    pp2 = tmp_path / "pp2"
    _resume_copy(full, pp2, 2)
    run_ranks(_train_worker, 2, _overrides(prepared, pp2, **{"parallel.pipeline": "2"}))
    got = _losses(pp2)
    assert sorted(got) == [3, 4, 5, 6]
    for s in got:
        assert got[s] == pytest.approx(reference[s], rel=1e-5), (s, got[s], reference[s])


@pytest.mark.slow
def test_qk_norm_trains_with_diagnostics_resumes_and_reshards_to_tp2(prepared, tmp_path) -> None:
    qk_norm = {"model.qk_norm": "true", "diagnostics.interval": "3", "model.num_query_groups": "2"}
    full = tmp_path / "full"
    run_ranks(
        _train_worker, 2, _overrides(prepared, full, **qk_norm)
    )  # DP=2, distributed optimizer
    reference = _losses(full)
    assert reference[6] < reference[1]
    plain = tmp_path / "plain"
    run_ranks(
        _train_worker, 2, _overrides(prepared, plain, **dict(qk_norm, **{"model.qk_norm": "false"}))
    )
    assert _losses(plain)[1] != reference[1]  # the switch changes the model
    from slowqk.monitor import read_diagnostics

    probed = read_diagnostics(full / "diagnostics.jsonl")  # at steps 1, 4 (every 3), every layer
    assert [r["step"] for r in probed] == [1, 4] and all(len(r["layers"]) == 4 for r in probed)
    assert all(0 < r["layers"]["3"]["entropy"] <= 1 for r in probed)
    for name, extra in (("resumed", {}), ("tp2", {"parallel.tensor": "2"})):
        run = tmp_path / name
        _resume_copy(full, run, 2)
        run_ranks(_train_worker, 2, _overrides(prepared, run, **qk_norm, **extra))
        got = _losses(run)
        assert sorted(got) == [3, 4, 5, 6]
        for s in (
            got
        ):  # the same layout bitwise; TP=2 (resharded, per-head norms replicated) to rounding
            assert got[s] == (
                reference[s] if not extra else pytest.approx(reference[s], rel=1e-5)
            ), (name, s)


@pytest.mark.slow
def test_pp2_trains_from_scratch(prepared, tmp_path) -> None:
    run = tmp_path / "pp2"
    summary = run_ranks(
        _train_worker,
        2,
        _overrides(prepared, run, **{"parallel.pipeline": "2", "train.save_interval": "null"}),
    )[0]
    losses = _losses(run)
    assert summary["steps"] == 6 and losses[6] < losses[1]
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_quickstart_command_prints_both_arms(tmp_path) -> None:
    """The README's main command, shortened: both arms train and the table lists both."""
    out = tmp_path / "qs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slowqk.cli",
            "quickstart",
            "--out",
            str(out),
            "--steps",
            "12",
            f"data.corpus={CORPUS}",
            "train.eval_interval=6",
            "model.seq_length=64",
            "train.progress_bar=false",
            "qk.unit=steps",
            "qk.hold=4",
            "qk.ramp=2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    rows = {
        line.split()[0]: line.split()
        for line in table.splitlines()
        if line.startswith(("control", "intervention"))
    }
    assert set(rows) == {"control", "intervention"}, table
    for arm, cols in rows.items():
        val_loss, ppl = float(cols[1]), float(cols[2])
        assert 0 < val_loss < 8 and ppl == pytest.approx(2.718281828**val_loss, rel=1e-3), arm
    results = json.loads((out / "results.json").read_text())
    assert results["intervention"]["qk_enabled"] and not results["control"]["qk_enabled"]
    # the intervention changed the run (tiny after 12 steps, but not zero)
    assert results["control"]["final_val_loss"] != results["intervention"]["final_val_loss"]
    assert (out / "loss_curves.png").stat().st_size > 10_000


def _inf_gradient_on_rank_1(rank: int, world: int, overrides: list[str]) -> dict:
    import math

    import torch

    from slowqk.config import load_recipe
    from slowqk.distributed import shutdown
    from slowqk.models import unwrap_model
    from slowqk.train import Trainer

    trainer = Trainer(load_recipe("tiny/gpt", overrides), quiet=True)
    chunk = trainer.engine.chunks[0]
    first = trainer.train_step()
    before = [p.detach().clone() for p in chunk.parameters()]
    weight = unwrap_model(chunk).decoder.layers[0].mlp.linear_fc1.weight
    if rank == 1:  # this rank's gradient of one weight only: its loss and the others stay finite
        handle = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    poisoned = trainer.train_step()
    if rank == 1:
        handle.remove()
    unchanged = all(torch.equal(p, b) for p, b in zip(chunk.parameters(), before, strict=True))
    after = trainer.train_step()
    trainer.metrics.close()
    shutdown()
    return {
        "skipped": [r["skipped"] for r in (first, poisoned, after)],
        "loss_finite": math.isfinite(poisoned["loss"]),
        "loss": poisoned["loss"],
        "unchanged": unchanged,
    }


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_all(prepared, tmp_path) -> None:
    """The verdict travels with the loss's reduction: one rank's infinite gradient (its loss
    finite) skips the update on both ranks, distributed optimizer and all, and the next step
    updates again."""
    res = run_ranks(_inf_gradient_on_rank_1, 2, _overrides(prepared, tmp_path / "inf"))
    for r in res:
        assert r["skipped"] == [False, True, False]
        assert r["loss_finite"] and r["unchanged"]
    assert res[0]["loss"] == res[1]["loss"]


# the tensor methods that read a value back to the host: on a GPU each waits for the device
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


def _host_reads_of_a_step(rank: int, world: int, overrides: list[str]) -> dict:
    """Host reads during one training step (the second; the first creates optimizer state), by
    method and calling package, counted by wrapping the tensor methods that read; and whether
    the step's loss was left on the device."""
    import sys

    import torch

    from slowqk.config import load_recipe
    from slowqk.distributed import shutdown
    from slowqk.train import Trainer

    trainer = Trainer(load_recipe("tiny/gpt", overrides), quiet=True)
    trainer.train_step()
    counts: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name, method):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            where = "slowqk" if "/slowqk/" in caller else caller.split("/site-packages/")[-1]
            key = f"{name} {where.split('/')[0]}"
            counts[key] = counts.get(key, 0) + 1
            return method(self, *args, **kwargs)

        return read

    for name, method in originals.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        rec = trainer.train_step()
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    loss_on_device = isinstance(rec["loss"], torch.Tensor)
    due = [s for s in range(1, 9) if (setattr(trainer, "step", s), trainer._stop_check_due())[1]]
    trainer.metrics.close()
    shutdown()
    return {"counts": counts, "loss_on_device": loss_on_device, "stop_checks": due}


def test_a_step_reads_the_host_once_whatever_its_micro_batches(prepared, tmp_path) -> None:
    """Losses stay on the device until a step is logged: a step of 4 micro-batches reads back to
    the host as often as a step of 1 (the skip verdict once, megatron-core's optimizer its own),
    and the ranks agree on a stop every train.stop_check_interval steps."""
    runs = {}
    for micro in (2, 8):  # global batch 8: 4 micro-batches, then 1
        extra = {"train.micro_batch_size": str(micro), "train.stop_check_interval": "4"}
        runs[micro] = run_ranks(
            _host_reads_of_a_step, 1, _overrides(prepared, tmp_path / str(micro), **extra)
        )[0]
    assert runs[2]["counts"] == runs[8]["counts"], runs
    assert all(r["loss_on_device"] for r in runs.values())
    # this package's own: the verdict, once (the others are megatron-core's and torch's)
    own = {k: n for k, n in runs[2]["counts"].items() if k.endswith(" slowqk")}
    assert own == {"item slowqk": 1}, runs[2]["counts"]
    assert runs[2]["stop_checks"] == [4, 8]


def test_an_evaluation_at_step_0_changes_no_other_number(prepared, tmp_path) -> None:
    """train.eval_at_start logs the validation loss of the initial weights at step 0; the
    training and validation losses after it are bitwise those of a run without it."""
    records = {}
    for at_start in ("false", "true"):
        run = tmp_path / at_start
        extra = {"train.eval_at_start": at_start, "qk.enabled": "false", "train.save_interval": "6"}
        run_ranks(_train_worker, 1, _overrides(prepared, run, **extra))
        records[at_start] = _records(run)
    first = records["true"][0]
    assert first["step"] == 0 and set(first) == {"step", "val_loss", "val_ppl"}
    assert first["val_loss"] > records["true"][-1]["val_loss"]  # training lowered it

    def numbers(recs: list[dict]) -> list[dict]:  # all but the timings
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]

    assert numbers(records["true"][1:]) == numbers(records["false"])
    assert all(r["step"] > 0 for r in records["false"])
