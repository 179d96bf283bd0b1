"""megatron-core as the engine: its DDP (with or without the distributed optimizer), tensor and
pipeline parallelism through its schedules, and ``dist_checkpointing``."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from slowqk.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from slowqk.config import Recipe
from slowqk.engines.base import Engine
from slowqk.engines.common import device_batches, mean_on_device
from slowqk.lower_drift import optimizer_is_sharded
from slowqk.lr_groups import iter_main_params
from slowqk.models import (
    build_model_chunks,
    build_transformer_config,
    unwrap_model,
    wrap_precision,
)
from slowqk.optim import build_optimizer, build_scheduler, finish_param_gather, wrap_ddp


def _probe_loss(output: torch.Tensor):
    return output.float().sum() * 0.0, {}


class MegatronEngine(Engine):
    name = "megatron"

    @classmethod
    def check_checkpoint(cls, path: Path, saved: dict, recipe: Recipe, data_parallel: int) -> None:
        """Nothing to refuse: ``dist_checkpointing`` reshards over tensor, pipeline and data
        parallelism (the padded vocabulary is checked once the tokenizer is known)."""

    def _build(self, vocab_size: int, init_weights: Path | None) -> None:
        recipe, layout, device = self.recipe, self.layout, self.device
        t = recipe.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * layout.data)
        self.config = build_transformer_config(
            recipe.model,
            tensor_parallel=recipe.parallel.tensor,
            pipeline_parallel=recipe.parallel.pipeline,
            virtual_pipeline=recipe.parallel.virtual_pipeline,
            precision=t.precision,
            fused_kernels=t.fused_kernels,
            recompute=t.recompute,
            sequence_parallel=recipe.parallel.sequence_parallel,
        )
        vpp = recipe.parallel.virtual_pipeline
        models = [
            chunk.to(device)
            for chunk in build_model_chunks(
                recipe.model, self.config, vocab_size, probe=recipe.diagnostics.interval > 0
            )
        ]
        if init_weights is not None:  # before DDP and the optimizer copy them into their buffers
            load_model_weights(init_weights, models)
        models = [wrap_precision(m, self.config) for m in models]
        self.chunks = wrap_ddp(models, self.config, recipe.parallel)
        model = models[0]
        if t.compile:  # in place: parameter names, hooks and checkpoints stay as they are
            # The whole model, not each layer: one graph from the embedding to the loss fuses
            # across layer boundaries and pays dynamo's guards and wrappers once per micro-batch.
            unwrap_model(model).compile()
        self.optimizer = build_optimizer(recipe, self.chunks)
        self.scheduler = build_scheduler(recipe, self.optimizer)
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        if vpp and dist.get_backend() == "gloo":
            # gloo pairs the sends and receives between two ranks by their order alone, and the
            # interleaved schedule's batched exchanges (a forward and a backward tensor between
            # the same two ranks at PP=2) then cross: measured, PP2 x VPP2 losses off PP2's from
            # the first step. One operation at a time keeps them paired (bitwise with PP2).
            self.config.batch_p2p_comm = False
        self._schedule = get_forward_backward_func()
        # set by each training forward_backward: a non-finite loss or gradient on some rank
        self._step_bad = torch.zeros((), dtype=torch.bool, device=self.device)

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(self._loss, batch["loss_mask"])

    def _loss(self, loss_mask: torch.Tensor, output: torch.Tensor):
        loss = self.loss_fn(loss_mask, output)
        # A copy: megatron's schedule divides the returned loss by num_microbatches in place.
        return loss, {"lm loss": loss.detach().clone()}

    def forward_backward(self, dataset, step: int, forward_only: bool) -> torch.Tensor:
        dp_rank = parallel_state.get_data_parallel_rank()
        losses = self._schedule(
            forward_step_func=self._forward_step,
            # one iterator per model chunk (the interleaved schedule reads each chunk's own)
            data_iterator=self._per_chunk(
                lambda: device_batches(
                    self.recipe, dataset, step, dp_rank, self.layout.data, self.device
                )
            ),
            model=self.chunks,
            num_microbatches=self.num_microbatches,
            seq_length=self.recipe.model.seq_length,
            micro_batch_size=self.recipe.train.micro_batch_size,
            forward_only=forward_only,
        )
        # One all-reduce over every rank carries what the step needs to know: the loss (lives
        # on the last pipeline stage; counted once per data-parallel replica, by its first
        # tensor rank) and whether any rank's gradients are non-finite (each rank its own).
        # Nothing is read back here: the verdict when the optimizer steps, the loss when logged.
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        if (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            stats[0] = mean_on_device([x["lm loss"] for x in losses], self.device)
        if not forward_only:
            stats[1] = self._local_grads_nonfinite()
        dist.all_reduce(stats)
        loss = stats[0] / self.layout.data
        if not forward_only:  # an evaluation pass leaves the training step's verdict alone
            self._step_bad = (stats[1] > 0) | ~torch.isfinite(loss)
        return loss

    def _per_chunk(self, make):
        """One data iterator, or one per model chunk under virtual stages."""
        return make() if len(self.chunks) == 1 else [make() for _ in self.chunks]

    def zero_grad(self) -> None:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _local_grads_nonfinite(self) -> torch.Tensor:
        """1 if a gradient this rank holds is non-finite (before the reduce, or its reduced
        shard), else 0."""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for chunk in self.chunks:
            for buf in [*chunk.buffers, *chunk.expert_parallel_buffers]:
                # min and max carry any NaN or infinity, in one read of the buffer and no
                # element-wise temporary (a tenth of isfinite(...).all()'s time on a CPU)
                bad |= ~torch.isfinite(torch.stack(torch.aminmax(buf.grad_data))).all()
        return bad.double()

    def optimizer_step(self, loss: torch.Tensor) -> tuple[bool, float | None]:
        # the verdict forward_backward shared: the same on every rank; the step's one read
        if self._step_bad.item():
            return False, None
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(1)
        return ok, grad_norm

    def probe_forward(self, batch: dict) -> None:
        """Under virtual stages the interleaved schedule needs as many micro-batches as pipeline
        ranks: the same batch again, which records the same probabilities."""

        def step(data_iterator, model):
            next(data_iterator)
            return model(batch["tokens"], batch["position_ids"], None), _probe_loss

        repeats = self.layout.pipeline if len(self.chunks) > 1 else 1
        self._schedule(
            forward_step_func=step,
            data_iterator=self._per_chunk(lambda: iter([batch] * repeats)),
            model=self.chunks,
            num_microbatches=repeats,
            seq_length=batch["tokens"].shape[1],
            micro_batch_size=batch["tokens"].shape[0],
            forward_only=True,
        )

    def layer_grad_sq(self, layer_of_param: dict[int, int], num_layers: int) -> torch.Tensor:
        """Squared norm per layer of the reduced gradient the optimizer sees (before clipping),
        summed over the data-parallel ranks, each element once; over this rank's tensor and
        pipeline share (the caller reduces over those)."""
        sq = torch.zeros(num_layers, dtype=torch.float64, device=self.device)
        for _, model_param, _, lo, hi in iter_main_params(self.optimizer):
            layer = layer_of_param.get(id(model_param))
            if layer is None or not param_is_not_tensor_parallel_duplicate(model_param):
                continue
            # after the grad sync main_grad holds the reduced gradient over [lo, hi) (the shard
            # this rank's optimizer owns under the distributed optimizer, else all of it)
            g = model_param.main_grad.detach().reshape(-1)[lo:hi]
            sq[layer] += g.double().pow(2).sum()
        if optimizer_is_sharded(self.optimizer) and self.layout.data > 1:
            dist.all_reduce(sq, group=parallel_state.get_data_parallel_group())
        return sq

    def full_weights(self, params: list[torch.nn.Parameter]):
        """Each rank holds its parameters whole (its TP piece); with the parameter gather
        overlapped, the last update's gather is finished first."""
        finish_param_gather(self.chunks)
        return contextlib.nullcontext()

    def train_mode(self, training: bool) -> None:
        for c in self.chunks:
            c.train(training)

    def save(self, ckpt_root: Path, step: int, extra: dict, files: dict[str, Path]) -> Path:
        finish_param_gather(self.chunks)
        return save_checkpoint(
            ckpt_root, step, self.chunks, self.optimizer, self.scheduler, extra, files=files
        )

    def load(self, path: Path) -> dict:
        return load_checkpoint(path, self.chunks, self.optimizer, self.scheduler)
