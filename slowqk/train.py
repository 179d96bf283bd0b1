"""The training loop, one for both engines: megatron-core (TP, PP, DP, the distributed
optimizer) and DeepSpeed ZeRO 1-3 (:mod:`slowqk.engines`), extended by callbacks
(:mod:`slowqk.callbacks`: the learning-rate groups and Q/K release, the lower layers' drift,
diagnostics with the early warning, fault injection).

One process per rank (torchrun, SLURM or a single process). The loop owns what every run has:
data order, evaluation, logging, checkpoints and resume, stop signals, the non-finite-loss policy.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from slowqk.callbacks import Callback, callback_classes
from slowqk.checkpoint import prune_checkpoints, remove_leftovers, write_atomic
from slowqk.config import Recipe, RecipeChangedError, recipe_to_yaml
from slowqk.data.run_data import build_run_data, check_out_dir
from slowqk.data.stage import needs_stage, prepare_stage, stage_dir
from slowqk.distributed import PeerTimeout, init_distributed, is_peer_timeout, shutdown
from slowqk.engines import build_engine
from slowqk.metrics import MetricsWriter
from slowqk.models import resolve_attention_backend
from slowqk.provenance import provenance
from slowqk.resume import check_resume_fits, init_source, resumable_checkpoint
from slowqk.validation import Validator, perplexity

__all__ = ["RecipeChangedError", "Trainer", "train"]

EXIT_PREEMPTED = 75  # a signal asked the run to stop; a checkpoint was saved; resume to continue
EXIT_FORCED = 76  # a second signal: stopped at once, without a checkpoint
EXIT_NONFINITE = 3  # too many non-finite steps; the last good checkpoint is kept
EXIT_PEER_TIMEOUT = 4  # a peer rank did not answer within train.dist_timeout

log = logging.getLogger("slowqk.train")


class Preempted(Exception):
    """A stop signal was handled: the checkpoint is saved."""


class NonFiniteError(FloatingPointError):
    pass


class _StopSignals:
    """SIGTERM / SIGUSR1: finish the step, checkpoint, exit 75. A second signal: exit 76 at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> _StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(EXIT_FORCED)
        self.received = signum


class _Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.start = now - self.start, now
        return dt


class Trainer:
    """Builds everything from a recipe; ``run()`` trains to ``recipe.train.steps``."""

    def __init__(
        self,
        recipe: Recipe,
        quiet: bool = False,
        resume: bool = True,
        allow_recipe_change: bool = False,
    ) -> None:
        """``resume``: continue from the run's newest good checkpoint, if any (checked for recipe
        changes at once, before any data work; ``allow_recipe_change`` lets them through)."""
        self.recipe, self.quiet = recipe, quiet
        t = recipe.train
        self.layout = init_distributed(recipe.parallel, recipe.seed, timeout_s=t.dist_timeout)
        self.rank = self.layout.rank
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.run_dir = recipe.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        per_step = t.micro_batch_size * self.layout.data
        if t.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size "
                f"({self.layout.data})"
            )
        for name in remove_leftovers(self.ckpt_root):  # what interrupted saves left
            log.info("removed %s: the partial copy of an interrupted save", self.ckpt_root / name)
        self.resume_from = (
            resumable_checkpoint(self.ckpt_root, recipe, self.layout.data, allow_recipe_change)
            if resume
            else None
        )
        self._resolve_attention_backend()
        # prepared data only (train() ran the data stage); rank 0 builds the index caches
        data = build_run_data(recipe, self.rank, self.run_dir)
        self.tokenizer, self.vocab_size = data.tokenizer, data.vocab_size
        self.train_ds, self.valid_ds = data.train, data.valid
        init = None
        if t.init_from and self.resume_from is None:  # a resume brings its own weights
            init = init_source(recipe, self.tokenizer.sha256, self.vocab_size)
        self.engine = build_engine(
            recipe, self.layout, self.device, self.vocab_size, init_weights=init
        )
        if init is not None:
            log.info("initialized weights from %s", init)
        self.validator = Validator(recipe, self.engine, self.valid_ds)
        self.metrics = MetricsWriter(self.run_dir, t.tensorboard, enabled=self.rank == 0)
        self.bar: tqdm | None = None  # the progress bar while run() trains
        self.step = 0
        self.consecutive_skips = 0
        self.total_skips = 0
        self.callbacks: list[Callback] = []
        for cls in callback_classes():  # in order: a callback may look up those before it
            cb = cls.build(self)
            if cb is not None:
                self.callbacks.append(cb)

    def _resolve_attention_backend(self) -> None:
        """The environment's side of the model choice, before any data work (errors at once)."""
        self.attention_backend = resolve_attention_backend(self.recipe.model.attention_backend)
        self.use_te = self.attention_backend == "te"
        if self.rank == 0:
            log.info(
                "attention backend: %s (Transformer Engine %s)",
                self.attention_backend,
                "in use"
                if self.use_te
                else "not in use: megatron-core's torch fallbacks for norms and optimizer",
            )

    # what tools and tests read from a trainer
    @property
    def chunks(self) -> list[torch.nn.Module]:
        return self.engine.chunks

    @property
    def config(self):
        return self.engine.config

    @property
    def optimizer(self):
        return self.engine.optimizer

    def callback(self, cls: type[Callback]) -> Callback | None:
        """The run's callback of type ``cls`` (None if the recipe does not use it)."""
        return next((c for c in self.callbacks if isinstance(c, cls)), None)

    def _hooks(self, name: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self, *args)

    # ------------------------------------------------------------------ steps

    def evaluate(self) -> float:
        """The validation loss now (see :class:`~slowqk.validation.Validator`)."""
        return self.validator.evaluate()

    def train_step(self) -> dict:
        engine = self.engine
        engine.zero_grad()
        rec: dict = {"loss": None, "grad_norm": None, "lr": None}  # the record's first keys
        self._hooks("on_step_start", rec)
        rec["loss"] = loss = engine.forward_backward(self.train_ds, self.step, forward_only=False)
        rec["lr"] = engine.optimizer.param_groups[0]["lr"]  # the lr this update uses
        self._hooks("before_update", rec)
        updated, grad_norm = engine.optimizer_step(loss)
        if updated:
            self.consecutive_skips = 0
        else:  # no update: params, optimizer state and LR schedule stay as they were
            self.consecutive_skips += 1
            self.total_skips += 1
            log.warning(
                "step %d: non-finite loss or gradients; update skipped (%d in a row)",
                self.step,
                self.consecutive_skips,
            )
        self.step += 1
        self._hooks("after_update", rec, updated)
        rec["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        rec.update(skipped=not updated, skipped_total=self.total_skips)
        return rec

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        extra = {
            "recipe": self.recipe.model_dump(mode="json"),
            "tokenizer_sha256": self.tokenizer.sha256,
            "padded_vocab_size": self.vocab_size,
            "vocab_size": self.recipe.model.vocab_size or self.tokenizer.vocab_size,
            "tokenizer_file": f"tokenizer/{self.tokenizer.path.name}",
            "consumed_samples": self.step * self.recipe.train.global_batch_size,
            "skipped_total": self.total_skips,
            "data_parallel": self.layout.data,
        }
        # each callback's state under its own name
        extra["callbacks"] = {cb.name: state for cb in self.callbacks if (state := cb.state_dict())}
        files = {f"tokenizer/{self.tokenizer.path.name}": self.tokenizer.path}
        path = self.engine.save(self.ckpt_root, self.step, extra, files)
        t = self.recipe.train
        prune_checkpoints(self.ckpt_root, t.keep_last, t.keep_every)
        return path

    def maybe_resume(self) -> bool:
        if self.resume_from is None:
            return False
        path, saved, changes = self.resume_from
        if changes:
            log.warning("resuming %s with recipe changes: %s", path, "; ".join(changes))
            if self.rank == 0:
                with open(self.run_dir / "recipe_changes.jsonl", "a") as f:
                    f.write(json.dumps({"checkpoint": path.name, "changes": changes}) + "\n")
        check_resume_fits(path, saved, self.tokenizer.sha256, self.vocab_size, self.recipe)
        extra = self.engine.load(path)
        self.step = int(extra["step"])
        self.total_skips = int(extra.get("skipped_total", 0))
        states = extra.get("callbacks")
        for cb in self.callbacks:
            state = cb.legacy_state(extra) if states is None else states.get(cb.name)
            if state is not None:
                cb.load_state_dict(state)
        self.metrics.truncate_after(self.step)  # resumed logs have no duplicates
        self._hooks("on_resume")
        return True

    # ------------------------------------------------------------------ main loop

    def _stop_agreed(self, stop: _StopSignals) -> bool:
        """True on every rank if any rank received a stop signal (they may arrive unevenly)."""
        flag = torch.tensor([1.0 if stop.received is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _check_nonfinite(self, rec: dict) -> None:
        t = self.recipe.train
        if rec["skipped"] and (
            t.on_nonfinite == "stop" or self.consecutive_skips >= t.max_consecutive_skips
        ):
            self._write(rec)
            raise NonFiniteError(
                f"non-finite loss or gradients at step {self.step - 1} "
                f"({self.consecutive_skips} in a row, train.on_nonfinite={t.on_nonfinite}, "
                f"max_consecutive_skips={t.max_consecutive_skips}); the last good checkpoint "
                "is kept"
            )

    def _write(self, rec: dict) -> None:
        """The step's record to the metrics; its loss is read from the device here."""
        rec["loss"] = float(rec["loss"])
        self.metrics.log(self.step, rec)

    def _stop_check_due(self) -> bool:
        """The ranks agree on a stop every ``train.stop_check_interval`` steps, all at the same
        steps."""
        return self.step % self.recipe.train.stop_check_interval == 0

    def _log(self, rec: dict) -> None:
        """Log the step's record where due; the loss is read from the device only then."""
        t = self.recipe.train
        if (
            self.step % t.log_interval == 0
            or "val_loss" in rec
            or self.step == t.steps
            or rec["skipped"]
            or any(cb.must_log(rec) for cb in self.callbacks)
        ):
            self._write(rec)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")

    def _loop(self, timer: _Timer, stop: _StopSignals) -> None:
        t = self.recipe.train
        tokens_per_step = self.recipe.tokens_per_step
        while self.step < t.steps:
            rec = self.train_step()
            dt = timer.lap()
            self._train_time += dt
            rec["tokens_per_s"] = tokens_per_step / dt
            rec["tokens"] = self.step * tokens_per_step
            self._updated_steps += not rec["skipped"]
            self._check_nonfinite(rec)
            if self.validator.should_evaluate(self.step):
                rec.update(self.validator.record())
                timer.lap()  # evaluation is not training time
            self._log(rec)
            self.bar.update(1)
            if self._stop_check_due() and self._stop_agreed(stop):
                self.save()
                raise Preempted(f"stop signal received; checkpoint saved at step {self.step}")
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
                self.save()
                timer.lap()
            self._hooks("on_step_end", rec)

    def run(self) -> dict:
        r, t = self.recipe, self.recipe.train
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(recipe_to_yaml(r))
        resumed = self.maybe_resume()
        self.bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=self.rank != 0 or not t.progress_bar or self.quiet,
            desc=r.name,
            unit="step",
            dynamic_ncols=True,
            mininterval=2.0,
        )
        if self.step == 0 and self.validator.should_evaluate(0):
            self.metrics.log(0, self.validator.record())
        timer, start = _Timer(), self.step
        self._train_time, self._updated_steps = 0.0, 0
        with _StopSignals() as stop:
            self._loop(timer, stop)
        self.bar.close()
        if t.save_interval and self.step > start:
            self.save()
        summary = self._summary(resumed, self.evaluate())
        if self.rank == 0:
            summary["provenance"] = provenance()
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        self.metrics.close()
        return summary

    def _summary(self, resumed: bool, final: float) -> dict:
        r, seconds = self.recipe, self._train_time
        summary = {
            "name": r.name,
            "engine": self.engine.name,
            "steps": self.step,
            "resumed": resumed,
            "final_val_loss": final,
            "final_val_ppl": perplexity(final),
            "train_seconds": seconds,
            "tokens_per_s": (
                self._updated_steps * r.tokens_per_step / seconds if seconds > 0 else None
            ),
            "skipped_steps": self.total_skips,
        }
        for cls in callback_classes():  # the same keys whichever callbacks the run has
            summary.update(cls.absent_summary())
        for cb in self.callbacks:
            summary.update(cb.summary())
        return summary


def _peer_timeout(recipe: Recipe, where: str) -> PeerTimeout:
    rank = int(os.environ.get("RANK", "0"))
    return PeerTimeout(
        f"rank {rank}: a peer rank did not answer within "
        f"train.dist_timeout={recipe.train.dist_timeout:g} s {where}; checkpoints already written "
        "are intact (a stopped or hung rank? see the other ranks' logs)"
    )


def train(
    recipe: Recipe, resume: bool = True, quiet: bool = False, allow_recipe_change: bool = False
) -> dict:
    """Train ``recipe``: the data stage first (a corpus is prepared once, whichever rank comes
    first), then the trainer, which only reads prepared data."""
    check_out_dir(recipe.run_dir)
    if needs_stage(recipe.data):
        prepare_stage(recipe.data, stage_dir(recipe))
    try:
        trainer = Trainer(
            recipe, quiet=quiet, resume=resume, allow_recipe_change=allow_recipe_change
        )
    except BaseException as exc:
        if is_peer_timeout(exc):
            raise _peer_timeout(recipe, "while starting") from None
        raise
    peer_lost = False
    try:
        return trainer.run()
    except BaseException as exc:
        if is_peer_timeout(exc):
            peer_lost = True
            raise _peer_timeout(recipe, f"at step {trainer.step + 1}") from None
        raise
    finally:
        trainer.metrics.close()
        if not peer_lost:  # shutdown's barrier would wait for the peer that does not answer
            shutdown()
