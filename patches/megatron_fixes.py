"""Fixes for megatron-core bugs met on our supported paths; each version-guarded and idempotent.

- ``DistributedOptimizer._set_main_param_and_optimizer_states`` (0.16.x, 0.19.x): loading a
  ``fully_reshardable`` checkpoint with a torch Adam/AdamW (no TE/Apex) fails with
  ``KeyError: 'step'``: the loader leaves the per-parameter ``step`` out of the source tensors (it
  restores it through the common state) but the setter iterates over the destination's keys.
  The fix copies only the keys the loader provides.
- ``DistributedOptimizer.load_state_dict`` (0.16.x, 0.19.x, torch optimizers): the restored Adam
``step``
  is *one* tensor object put into every parameter's state; torch's AdamW then increments it once
  per parameter per step, so bias correction goes wrong after any resume. The fix gives every
  parameter its own copy.
- ``filesystem_async._get_write_results_queue`` (0.16.x, 0.19.x): the first checkpoint save of a
  rank starts a ``multiprocessing`` manager process (spawned, ~270 MB: it re-imports the rank's
  main module) that lives as long as the rank. A rank killed with SIGKILL (a crashed node, a
  launcher's kill, ``kill -9``) leaves it running forever. The fix starts the same manager with an
  initializer that ties its life to the rank's (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.managers import SyncManager

import torch

_applied = False
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _patch_set_main_param_states() -> None:
    # deferred: megatron-core is slow to import; only applying the patch needs it
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
    # deferred: megatron-core is slow to import; only applying the patch needs it
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


def die_with_parent(parent_pid: int) -> None:
    """Run in a helper process: SIGKILL it when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(0)


def _patch_results_queue() -> None:
    # deferred: megatron-core is slow to import; only applying the patch needs it
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_get_write_results_queue") or not sys.platform.startswith(
        "linux"
    ):
        return

    def results_queue():
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    results_queue.__wrapped__ = filesystem_async._get_write_results_queue
    filesystem_async._get_write_results_queue = results_queue


def apply() -> None:
    global _applied
    if _applied:
        return
    # deferred: megatron-core is slow to import; only applying the patch needs it
    from megatron.core import package_info

    if package_info.__version__.startswith(("0.16", "0.19")):
        _patch_set_main_param_states()
        _patch_unshare_adam_step()
        _patch_results_queue()
    _applied = True
