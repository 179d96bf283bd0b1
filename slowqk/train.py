"""The training loop: megatron-core model, DDP, optimizer, pipeline schedule, Q/K scaling.

One process per rank (torchrun, SLURM or a single process). Tensor and pipeline parallel come from
megatron-core; data parallel from its DDP (with or without the distributed optimizer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from slowqk.config import ModelConfig, Recipe, architecture, recipe_to_yaml
from slowqk.distributed import PeerTimeout, init_distributed, is_peer_timeout, shutdown

EXIT_PREEMPTED = 75  # a signal asked the run to stop; a checkpoint was saved; resume to continue
EXIT_FORCED = 76  # a second signal: stopped at once, without a checkpoint
EXIT_NONFINITE = 3  # too many non-finite steps; the last good checkpoint is kept
EXIT_PEER_TIMEOUT = 4  # a peer rank did not answer within train.dist_timeout

log = logging.getLogger("slowqk.train")


class Preempted(Exception):
    """A stop signal was handled: the checkpoint is saved."""


class NonFiniteError(FloatingPointError):
    pass


class RecipeChangedError(ValueError):
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


_INJECT_NAN = False


class _Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.start = now - self.start, now
        return dt


def masked_mean_loss(loss_mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Mean per-token loss over the tokens the mask keeps (one micro-batch), in fp32."""
    mask = loss_mask.view(-1).float()
    return torch.sum(output.float().view(-1) * mask) / mask.sum()


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    loss = masked_mean_loss(loss_mask, output)
    if _INJECT_NAN:  # fault injection (slowqk.faults): poison the loss and so the gradients
        loss = loss * float("nan")
    # A copy: megatron's schedule divides the returned loss by num_microbatches in place.
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from slowqk.data.run_data import build_run_data
        from slowqk.metrics import MetricsWriter
        from slowqk.models import (
            build_gpt_model,
            build_transformer_config,
            resolve_attention_backend,
            wrap_precision,
        )
        from slowqk.optim import (
            build_lr_groups,
            build_optimizer,
            build_release,
            build_scheduler,
            wrap_ddp,
        )

        self.recipe = recipe
        self.quiet = quiet
        self.layout = init_distributed(
            recipe.parallel, recipe.seed, timeout_s=recipe.train.dist_timeout
        )
        self.rank = self.layout.rank
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.run_dir = recipe.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        t = recipe.train
        per_step = t.micro_batch_size * self.layout.data
        if t.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size "
                f"({self.layout.data})"
            )
        self.num_microbatches = t.global_batch_size // per_step

        from slowqk.checkpoint import remove_leftovers

        for name in remove_leftovers(
            self.ckpt_root
        ):  # what interrupted saves left (before any new one)
            log.info("removed %s: the partial copy of an interrupted save", self.ckpt_root / name)
        self.resume_from = self._resumable_checkpoint(allow_recipe_change) if resume else None
        # the environment's side of the model choice, before any data work (an error comes at once)
        self.attention_backend = resolve_attention_backend(recipe.model.attention_backend)
        self.use_te = self.attention_backend == "te"
        if self.rank == 0:
            log.info(
                "attention backend: %s (Transformer Engine %s)",
                self.attention_backend,
                "in use"
                if self.use_te
                else "not in use: megatron-core's torch fallbacks for norms and optimizer",
            )

        # ---- data (rank 0 prepares a corpus and the index caches; the others wait and read them)
        data = build_run_data(recipe, self.rank, self.run_dir)
        self.tokenizer, self.vocab_size = data.tokenizer, data.vocab_size
        self.train_ds, self.valid_ds = data.train, data.valid

        # ---- model, DDP, optimizer, schedules
        self.config = build_transformer_config(
            recipe.model,
            tensor_parallel=recipe.parallel.tensor,
            pipeline_parallel=recipe.parallel.pipeline,
            precision=t.precision,
            fused_kernels=t.fused_kernels,
        )
        model = build_gpt_model(
            recipe.model,
            self.config,
            self.vocab_size,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            probe=recipe.diagnostics.interval > 0,
        )
        model.to(self.device)
        if t.init_from and self.resume_from is None:  # a resume brings its own weights
            self._init_weights(model, t.init_from)
        model = wrap_precision(model, self.config)
        self.chunks = wrap_ddp([model], self.config, recipe.parallel.distributed_optimizer)
        self.optimizer = build_optimizer(recipe, self.chunks)
        self.scheduler = build_scheduler(recipe, self.optimizer)
        self.release = build_release(recipe)
        self.lr_groups = build_lr_groups(recipe, self.optimizer, self.chunks, self.release)
        self._build_drift_watch()
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()
        self.metrics = MetricsWriter(self.run_dir, t.tensorboard, enabled=self.rank == 0)
        from slowqk.monitor import Monitor

        self.monitor = Monitor(self) if recipe.diagnostics.interval > 0 else None
        self.step = 0
        self.consecutive_skips = 0
        self.total_skips = 0

    # ------------------------------------------------------------------ helpers

    def _build_drift_watch(self) -> None:
        """The lower layers' drift (the adaptive release's signal) and the early warning, which
        needs it to know whether the lower layers still move."""
        from slowqk.early_warning import SpecializationWarning
        from slowqk.lower_drift import LowerLayerDrift
        from slowqk.optim import drift_tracker, lower_layers, selected_layers

        d, lower = self.recipe.diagnostics, lower_layers(self.recipe)
        self.warning = None
        if d.interval > 0 and d.warn and lower:
            self.warning = SpecializationWarning(
                selected_layers(self.recipe), lower, d.warn_entropy_gap
            )
        self.tracker = (
            self.release.tracker
            if self.release is not None
            else (drift_tracker(self.recipe) if self.warning is not None else None)
        )
        self.drift = (
            LowerLayerDrift(self.optimizer, self.chunks, lower)
            if self.tracker is not None
            else None
        )

    def _measure_drift(self) -> bool:
        """Measure this step? Until the lower layers settle, and only while someone needs it."""
        if self.drift is None or self.tracker.settled:
            return False
        return self.warning is not None or not self.release.decided

    def _init_weights(self, model, source: str) -> None:
        """Load weights only (before DDP and the optimizer copy them into their buffers)."""
        from slowqk.checkpoint import load_model_weights, read_extra, resolve_checkpoint

        path = resolve_checkpoint(source)
        saved = read_extra(path)
        if saved.get("tokenizer_sha256") != self.tokenizer.sha256:
            raise ValueError(
                f"train.init_from={source}: the checkpoint's tokenizer differs from this run's "
                "(use its tokenizer: data.tokenizer=<checkpoint>/tokenizer/...)"
            )
        if saved.get("padded_vocab_size", self.vocab_size) != self.vocab_size:
            raise ValueError(
                f"train.init_from={source}: {saved['padded_vocab_size']} embedding rows, this run "
                f"has {self.vocab_size}"
            )
        mine, theirs = (
            architecture(self.recipe.model),
            architecture(ModelConfig.model_validate(saved["recipe"]["model"])),
        )
        diff = [
            f"model.{k}: {theirs[k]!r} (checkpoint) vs {v!r}"
            for k, v in mine.items()
            if theirs[k] != v
        ]
        if diff:
            raise ValueError(f"train.init_from={source}: architecture differs: " + "; ".join(diff))
        load_model_weights(path, [model])
        log.info("initialized weights from %s", path)

    def _iterator(self, dataset, step: int, dp_rank: int):
        from slowqk.data.loader import micro_batches

        t = self.recipe.train
        for batch in micro_batches(
            dataset, step, t.global_batch_size, t.micro_batch_size, dp_rank, self.layout.data
        ):
            yield _to_device(batch, self.device)

    def _run_schedule(self, dataset, step: int, forward_only: bool) -> float:
        """Forward(+backward) one global batch; the mean loss, the same on every rank."""
        from megatron.core import parallel_state

        dp_rank = parallel_state.get_data_parallel_rank()
        losses = self.forward_backward(
            forward_step_func=_forward_step,
            data_iterator=self._iterator(dataset, step, dp_rank),
            model=self.chunks,
            num_microbatches=self.num_microbatches,
            seq_length=self.recipe.model.seq_length,
            micro_batch_size=self.recipe.train.micro_batch_size,
            forward_only=forward_only,
        )
        # Loss lives on the last pipeline stage: average over micro-batches and DP, then share.
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage():
            value[0] = sum(x["lm loss"].item() for x in losses) / len(losses)
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= self.layout.data
        dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
        return value.item()

    def evaluate(self) -> float:
        """Mean loss over the first ``eval_iters`` validation batches: the same batches every
        time, so validation curves are comparable across steps and runs."""
        for c in self.chunks:
            c.eval()
        with torch.no_grad():
            iters = self.recipe.train.eval_iters
            total = sum(self._run_schedule(self.valid_ds, i, True) for i in range(iters)) / iters
        for c in self.chunks:
            c.train()
        return total

    def _grads_finite(self, loss: float) -> bool:
        """The same verdict on every rank: loss and every local gradient finite everywhere."""
        ok = math.isfinite(loss)
        for chunk in self.chunks:
            for buf in [*chunk.buffers, *chunk.expert_parallel_buffers]:
                ok = ok and bool(torch.isfinite(buf.grad_data).all())
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def train_step(self) -> dict:
        global _INJECT_NAN
        from slowqk import faults
        from slowqk.optim import step_multipliers

        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        mults = step_multipliers(self.lr_groups, self.step)
        measuring = self._measure_drift()
        if measuring:
            self.drift.arm()
        _INJECT_NAN = self.step in faults.nan_steps()
        try:
            loss = self._run_schedule(self.train_ds, self.step, forward_only=False)
        finally:
            _INJECT_NAN = False
        lr = self.optimizer.param_groups[0]["lr"]  # the lr this update uses
        grad_norm, skipped = None, False
        if self.monitor is not None:
            with self.monitor.timed():
                self.monitor.before_update(self.step)
        if self._grads_finite(loss):
            ok, grad_norm, _ = self.optimizer.step()
            skipped = not ok
        else:
            skipped = True  # no update: params, optimizer state and LR schedule stay as they were
        if skipped:
            self.consecutive_skips += 1
            self.total_skips += 1
            log.warning(
                "step %d: non-finite loss or gradients; update skipped (%d in a row)",
                self.step,
                self.consecutive_skips,
            )
        else:
            self.consecutive_skips = 0
            self.scheduler.step(1)
        drift = self.drift.collect(lr) if measuring else None  # None after a skipped update
        self.step += 1
        released = self.release.observe(self.step, drift) if self.release is not None else False
        if self.release is None and drift is not None:
            self.tracker.update(self.step, drift)
        if self.monitor is not None:
            with self.monitor.timed():
                self.monitor.after_update(self.step)
        rec = {
            "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": lr,
            **mults,
            "skipped": skipped,
            "skipped_total": self.total_skips,
        }
        if measuring:
            rec["lower_drift"], rec["lower_drift_ratio"] = drift, self.tracker.ratio
        if released:
            rec["qk_release"] = self.release.record()
            if self.rank == 0:
                log.info(
                    "qk: release at step %d: %s", self.release.release_step, self.release.describe()
                )
        return rec

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        from slowqk.checkpoint import prune_checkpoints, save_checkpoint

        path = save_checkpoint(
            self.ckpt_root,
            self.step,
            self.chunks,
            self.optimizer,
            self.scheduler,
            {
                "recipe": self.recipe.model_dump(mode="json"),
                "tokenizer_sha256": self.tokenizer.sha256,
                "padded_vocab_size": self.vocab_size,
                "vocab_size": self.recipe.model.vocab_size or self.tokenizer.vocab_size,
                "tokenizer_file": f"tokenizer/{self.tokenizer.path.name}",
                "consumed_samples": self.step * self.recipe.train.global_batch_size,
                "skipped_total": self.total_skips,
                **self._decision_state(),
            },
            files={f"tokenizer/{self.tokenizer.path.name}": self.tokenizer.path},
        )
        prune_checkpoints(self.ckpt_root, self.recipe.train.keep_last, self.recipe.train.keep_every)
        return path

    def _decision_state(self) -> dict:
        """The release decision, the drift signal and the early warning: saved with the
        checkpoint, so a resumed run decides as an uninterrupted one."""
        state = {}
        if self.release is not None:
            state["qk_release"] = self.release.state_dict()
        elif self.tracker is not None:
            state["drift_tracker"] = self.tracker.state_dict()
        if self.warning is not None:
            state["specialization_warning"] = self.warning.state_dict()
        return state

    def _load_decision_state(self, extra: dict) -> None:
        if self.release is not None and "qk_release" in extra:
            self.release.load_state_dict(extra["qk_release"])
        elif self.tracker is not None and "drift_tracker" in extra:
            self.tracker.load_state_dict(extra["drift_tracker"])
        elif self.tracker is not None and "qk_release" in extra:  # the tracker of an adaptive run
            self.tracker.load_state_dict(extra["qk_release"]["tracker"])
        if self.warning is not None and "specialization_warning" in extra:
            self.warning.load_state_dict(extra["specialization_warning"])

    def _resumable_checkpoint(
        self, allow_recipe_change: bool
    ) -> tuple[Path, dict, list[str]] | None:
        """The checkpoint a resume would load, its run information and the recipe changes; refused
        here, before any data work, when the recipe changed in ways that alter the run."""
        from slowqk.checkpoint import latest_checkpoint, read_extra
        from slowqk.config import run_altering_changes

        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            return None
        saved = read_extra(path)
        changes = run_altering_changes(saved["recipe"], self.recipe.model_dump(mode="json"))
        if changes and not allow_recipe_change:
            raise RecipeChangedError(
                f"{path}: the recipe differs from the checkpoint's in fields that alter the run: "
                + "; ".join(changes)
                + " (pass --allow-recipe-change if intended)"
            )
        return path, saved, changes

    def maybe_resume(self) -> bool:
        from slowqk.checkpoint import load_checkpoint

        if self.resume_from is None:
            return False
        path, saved, changes = self.resume_from
        if changes:
            log.warning("resuming %s with recipe changes: %s", path, "; ".join(changes))
            if self.rank == 0:
                with open(self.run_dir / "recipe_changes.jsonl", "a") as f:
                    f.write(json.dumps({"checkpoint": path.name, "changes": changes}) + "\n")
        if saved.get("tokenizer_sha256") != self.tokenizer.sha256:
            raise ValueError(f"{path}: tokenizer sha256 differs from the recipe's tokenizer")
        saved_vocab = saved.get("padded_vocab_size", self.vocab_size)
        if saved_vocab != self.vocab_size:
            raise ValueError(
                f"{path}: the checkpoint's padded vocabulary has {saved_vocab} rows, this layout "
                f"pads to {self.vocab_size} (model.make_vocab_size_divisible_by="
                f"{self.recipe.model.make_vocab_size_divisible_by}, "
                f"parallel.tensor={self.recipe.parallel.tensor}); resume with a tensor-parallel "
                f"size that divides {saved_vocab} and make_vocab_size_divisible_by"
            )
        extra = load_checkpoint(path, self.chunks, self.optimizer, self.scheduler)
        self.step = int(extra["step"])
        self.total_skips = int(extra.get("skipped_total", 0))
        self._load_decision_state(extra)
        if self.rank == 0:
            self._truncate_metrics(self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        """Drop records of steps after the checkpoint, so resumed logs have no duplicates."""
        for name in ("metrics.jsonl", "diagnostics.jsonl"):
            path = self.run_dir / name
            if not path.is_file():
                continue
            keep = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step
            ]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            tmp.replace(path)
        self.metrics.close()
        from slowqk.metrics import MetricsWriter

        self.metrics = MetricsWriter(self.run_dir, self.recipe.train.tensorboard, enabled=True)

    # ------------------------------------------------------------------ main loop

    def _stop_agreed(self, stop: _StopSignals) -> bool:
        """True on every rank if any rank received a stop signal (they may arrive unevenly)."""
        flag = torch.tensor([1.0 if stop.received is not None else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _loop(self, bar, timer: _Timer, history: list[float], stop: _StopSignals) -> None:
        from slowqk import faults

        t = self.recipe.train
        tokens_per_step = self.recipe.tokens_per_step
        self._train_time = 0.0
        while self.step < t.steps:
            rec = self.train_step()
            dt = timer.lap()
            self._train_time += dt
            rec["tokens_per_s"] = tokens_per_step / dt
            rec["tokens"] = self.step * tokens_per_step
            if not rec["skipped"]:
                history.append(rec["loss"])
            if rec["skipped"] and (
                t.on_nonfinite == "stop" or self.consecutive_skips >= t.max_consecutive_skips
            ):
                self.metrics.log(self.step, rec)
                raise NonFiniteError(
                    f"non-finite loss or gradients at step {self.step - 1} "
                    f"({self.consecutive_skips} in a row, train.on_nonfinite={t.on_nonfinite}, "
                    f"max_consecutive_skips={t.max_consecutive_skips}); the last good checkpoint "
                    "is kept"
                )
            if self.step % t.eval_interval == 0 or self.step == t.steps:
                rec["val_loss"] = self.evaluate()
                rec["val_ppl"] = math.exp(min(rec["val_loss"], 50.0))
                timer.lap()  # evaluation is not training time
            if (
                self.step % t.log_interval == 0
                or "val_loss" in rec
                or self.step == t.steps
                or rec["skipped"]
                or "qk_release" in rec
            ):
                self.metrics.log(self.step, rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            if self._stop_agreed(stop):
                self.save()
                raise Preempted(f"stop signal received; checkpoint saved at step {self.step}")
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
                self.save()
                timer.lap()
            faults.kill_at_step(self.step, self.rank)

    def run(self) -> dict:
        from tqdm import tqdm

        from slowqk.optim import lr_groups_record, release_record

        r, t = self.recipe, self.recipe.train
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(recipe_to_yaml(r))
        resumed = self.maybe_resume()
        tokens_per_step = r.tokens_per_step
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=self.rank != 0 or not t.progress_bar or self.quiet,
            desc=r.name,
            unit="step",
            dynamic_ncols=True,
            mininterval=2.0,
        )
        timer = _Timer()
        history: list[float] = []
        start = self.step
        with _StopSignals() as stop:
            self._loop(bar, timer, history, stop)
        bar.close()
        train_time = self._train_time
        if t.save_interval and self.step > start:
            self.save()
        final = self.evaluate()
        summary = {
            "name": r.name,
            "steps": self.step,
            "resumed": resumed,
            "final_val_loss": final,
            "final_val_ppl": math.exp(min(final, 50.0)),
            "train_seconds": train_time,
            "tokens_per_s": (len(history) * tokens_per_step / train_time)
            if train_time > 0
            else None,
            "skipped_steps": self.total_skips,
            "qk_enabled": r.qk.enabled,
            "qk_release": release_record(r, self.release),
            "lr_groups": lr_groups_record(r),
            "specialization_warning": self.warning.record() if self.warning is not None else None,
            "diagnostics_seconds": self.monitor.seconds if self.monitor is not None else 0.0,
            "drift_seconds": self.drift.seconds if self.drift is not None else 0.0,
            "lr_groups_seconds": self.lr_groups.seconds if self.lr_groups is not None else 0.0,
        }
        if self.rank == 0:
            from slowqk.provenance import provenance

            summary["provenance"] = provenance()
            tmp = self.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(self.run_dir / "summary.json")
        self.metrics.close()
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
