"""Fixes for megatron-core bugs met on our supported paths; each version-guarded and idempotent.

- ``DistributedOptimizer._set_main_param_and_optimizer_states`` (0.16.x, 0.19.x): loading a
  ``fully_reshardable`` checkpoint with a torch Adam/AdamW (no TE/Apex) fails with
  ``KeyError: 'step'``: the loader leaves the per-parameter ``step`` out of the source tensors (it
  restores it through the common state) but the setter iterates over the destination's keys.
  The fix copies only the keys the loader provides.
- ``DistributedOptimizer.load_state_dict`` (0.16.x, 0.19.x, torch optimizers): the restored Adam ``step``
  is *one* tensor object put into every parameter's state; torch's AdamW then increments it once
  per parameter per step, so bias correction goes wrong after any resume. The fix gives every
  parameter its own copy.
"""

from __future__ import annotations

import torch

_applied = False


def _patch_set_main_param_states() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    set_states.__wrapped__ = original
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def _patch_unshare_adam_step() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for param_state in self.optimizer.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.detach().clone()
        return result

    load_state_dict.__wrapped__ = original
    DistributedOptimizer.load_state_dict = load_state_dict


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.core import package_info

    if package_info.__version__.startswith(("0.16", "0.19")):
        _patch_set_main_param_states()
        _patch_unshare_adam_step()
    _applied = True
