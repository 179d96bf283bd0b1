"""DeepSpeed ZeRO (stages 1, 2, 3) as the engine for the same megatron-core models.

The model, data, LR schedule, learning-rate groups and everything the loop's callbacks do are
SlowQK's; DeepSpeed replaces megatron-core's DDP and optimizer, and checkpoints in its own format
(``<iter>/deepspeed/``, beside SlowQK's run information, RNG states and integrity record).
Supported: TP = PP = 1 (megatron-core's tensor/pipeline parallelism needs its own DDP and
schedules); fp32, or bf16 where DeepSpeed supports it. The learning-rate groups hook the torch
optimizer inside ZeRO and know which elements of each flat fp32 partition they cover (see
:func:`slowqk.lr_groups.iter_main_params`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from slowqk.checkpoint import (
    load_model_weights,
    load_rng_state,
    read_common_state,
    restore_scheduler,
    save_atomically,
    stop_signals_deferred,
    weights_only_loads,
    write_common_state,
)
from slowqk.config import Recipe, RecipeChangedError
from slowqk.engines.base import Engine
from slowqk.engines.common import device_batches, mean_on_device
from slowqk.lr_groups import iter_main_params
from slowqk.models import build_gpt_model, build_transformer_config
from slowqk.optim import build_scheduler

TAG = "deepspeed"  # DeepSpeed's own files, inside the checkpoint directory


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """megatron-core's default grouping: no weight decay on biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    # wd_mult: megatron-core's scheduler sets weight_decay = schedule x wd_mult on every group
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


def deepspeed_config(recipe: Recipe, data_parallel: int, stage: int) -> dict:
    t, o = recipe.train, recipe.optimizer
    cfg = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * data_parallel),
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1 << 30,
    }
    if o.clip_grad:
        cfg["gradient_clipping"] = o.clip_grad
    if t.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoints hold besides tensors and plain values: allowed for
    the weights-only load of files the integrity record has already verified."""
    # deferred: deepspeed is an optional extra, imported only where used
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class DeepSpeedEngine(Engine):
    @classmethod
    def check_checkpoint(cls, path: Path, saved: dict, recipe: Recipe, data_parallel: int) -> None:
        """ZeRO partitions its optimizer state by stage and data-parallel size: it loads only at
        both as saved."""
        stage, saved_stage = recipe.parallel.zero_stage, saved["recipe"]["parallel"]["zero_stage"]
        saved_dp = saved.get("data_parallel", data_parallel)
        if (stage, data_parallel) != (saved_stage, saved_dp):
            raise RecipeChangedError(
                f"{path}: a ZeRO-{saved_stage} checkpoint at data-parallel size {saved_dp}; this "
                f"run is ZeRO-{stage} at {data_parallel}. DeepSpeed loads its optimizer partitions "
                "only as they were written: resume with the same parallel.zero_stage and number "
                "of ranks"
            )

    def _build(self, vocab_size: int, init_weights: Path | None) -> None:
        recipe, layout, device = self.recipe, self.layout, self.device
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        # deferred: deepspeed is an optional extra; it picks its accelerator on import
        import deepspeed

        self.stage = stage = recipe.parallel.zero_stage
        self.name = f"deepspeed-zero{stage}"
        self.config = build_transformer_config(recipe.model, precision=recipe.train.precision)
        model = build_gpt_model(
            recipe.model, self.config, vocab_size, probe=recipe.diagnostics.interval > 0
        ).to(device)
        if init_weights is not None:  # before ZeRO partitions the parameters
            load_model_weights(init_weights, [model])
        o = recipe.optimizer
        inner = torch.optim.AdamW(
            param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
        )
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=inner, config=deepspeed_config(recipe, layout.data, stage)
        )
        self.chunks = [model]
        self.scheduler = build_scheduler(recipe, self.optimizer)

    def _loss(self, batch: dict) -> torch.Tensor:
        out = self.ds(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return self.loss_fn(batch["loss_mask"], out)

    def forward_backward(self, dataset, step: int, forward_only: bool) -> torch.Tensor:
        """The last micro-batch's ``engine.step()`` (the accumulation boundary, where ZeRO
        updates) is left to :meth:`optimizer_step`."""
        batches = list(
            device_batches(
                self.recipe, dataset, step, dist.get_rank(), self.layout.data, self.device
            )
        )
        losses = []
        for i, batch in enumerate(batches):
            loss = self._loss(batch)
            if not forward_only:
                self.ds.backward(loss)
                if i < len(batches) - 1:
                    self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step
            losses.append(loss)
        value = mean_on_device(losses, self.device)
        dist.all_reduce(value)
        return value / self.layout.data

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients itself after each boundary step."""

    def optimizer_step(self, loss: torch.Tensor) -> tuple[bool, float | None]:
        """ZeRO checks the reduced gradients and skips a non-finite step itself (``overflow``);
        the loss (the same on every rank) is checked too."""
        self.ds.step()
        if not torch.isfinite(loss).item() or bool(getattr(self.optimizer, "overflow", False)):
            return False, None
        self.scheduler.step(1)
        norm = self.ds.get_global_grad_norm()
        return True, float(norm) if norm is not None else None

    def probe_forward(self, batch: dict) -> None:
        self.ds(batch["tokens"], batch["position_ids"], None)

    def layer_grad_sq(self, layer_of_param: dict[int, int], num_layers: int) -> torch.Tensor:
        """Squared norm per layer of the reduced gradient (before clipping), from DeepSpeed's
        full-gradient accessor: every rank gets the whole gradient, so nothing is reduced after
        (a collective under ZeRO-3: every rank walks every parameter)."""
        # deferred: deepspeed is an optional extra, imported only where used
        from deepspeed.utils import safe_get_full_grad

        sq = torch.zeros(num_layers, dtype=torch.float64, device=self.device)
        for p in self.chunks[0].parameters():
            grad = safe_get_full_grad(p)
            layer = layer_of_param.get(id(p))
            if layer is not None and grad is not None:
                sq[layer] += grad.detach().double().pow(2).sum()
        return sq

    def full_weights(self, params: list[torch.nn.Parameter]):
        """ZeRO-3 holds a piece of each parameter: gather them whole while read (read-only)."""
        # deferred: deepspeed is an optional extra, imported only where used
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, enabled=self.stage == 3)

    def train_mode(self, training: bool) -> None:
        self.ds.train(training)

    def _state_bytes(self) -> int:
        """This rank's share of a save: fp32 weights, Adam's two moments (its partition), and on
        rank 0 the module's weights."""
        part = sum(main.numel() for _, _, main, _, _ in iter_main_params(self.optimizer))
        model = sum(getattr(p, "ds_numel", p.numel()) for p in self.chunks[0].parameters())
        return 4 * (3 * part + (model if dist.get_rank() == 0 else 0))

    def save(self, ckpt_root: Path, step: int, extra: dict, files: dict[str, Path]) -> Path:
        def write(tmp: Path) -> None:
            with stop_signals_deferred():
                self.ds.save_checkpoint(str(tmp), tag=TAG, client_state={}, save_latest=False)
            write_common_state(
                tmp, {"extra": {**extra, "step": step}, "scheduler": self.scheduler.state_dict()}
            )

        return save_atomically(ckpt_root, step, write, self._state_bytes(), files)

    def load(self, path: Path) -> dict:
        with (
            weights_only_loads(),
            torch.serialization.safe_globals(_deepspeed_safe_globals()),
            stop_signals_deferred(),
        ):
            loaded, _ = self.ds.load_checkpoint(
                str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if loaded is None:
            raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint under {TAG}/")
        common = read_common_state(path)
        restore_scheduler(self.scheduler, common["scheduler"])
        load_rng_state(path)
        return common["extra"]
