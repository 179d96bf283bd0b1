"""Run megatron-core's CUDA-only code on CPU with gloo.

megatron-core hard-codes CUDA in many places (``device='cuda'``, ``torch.cuda.current_device()``,
streams, CUDA RNG state, ``grad.type() == 'torch.cuda.FloatTensor'`` asserts). On a machine
without CUDA this module redirects those to the CPU so the *real* megatron-core DDP, optimizers,
pipeline schedules and checkpointing run unchanged. It is process-global and therefore:

- applied only when CUDA is absent (``apply()`` is a no-op otherwise),
- applied at most once, and
- pinned to the megatron-core versions it was tested with (others warn).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

TESTED_MEGATRON_VERSIONS = ("0.16",)

_applied = False
_mode: TorchFunctionMode | None = None


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream``: every method is a no-op on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Maps ``device='cuda'`` / ``.cuda()`` to CPU and makes ``.type()`` report CUDA names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron asserts grads are 'torch.cuda.FloatTensor'; report the CUDA name.
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"  # used as device=...; "cpu" is valid there
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = _NoOpStream
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Event = _NoOpStream
    # The RNG tracker saves/restores "CUDA" RNG states; on CPU the CPU generator plays that role.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0


def _patch_megatron() -> None:
    # deferred: patches load before megatron-core is imported
    from megatron.core.tensor_parallel import random as mrandom

    def set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(new_state)

    def get_rng_state(*args: Any, clone: bool = False, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    mrandom._set_cuda_rng_state = set_rng_state
    mrandom._get_cuda_rng_state = get_rng_state
    torch.cuda.random.get_rng_state = get_rng_state


def megatron_version() -> str:
    # deferred: patches load before megatron-core is imported
    from megatron.core import package_info

    return package_info.__version__


def apply(force: bool = False) -> bool:
    """Install the CPU compatibility layer. Returns True if it is active after the call."""
    global _applied, _mode
    if _applied:
        return True
    if torch.cuda.is_available() and not force:
        return False
    version = megatron_version()
    if not version.startswith(TESTED_MEGATRON_VERSIONS):
        warnings.warn(
            f"slowqk CPU compatibility layer is tested with megatron-core "
            f"{', '.join(TESTED_MEGATRON_VERSIONS)}.x, found {version}",
            stacklevel=2,
        )
    _patch_torch_cuda()
    _patch_megatron()
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    _applied = True
    return True


def enable_float64_verification() -> None:
    """Let megatron-core's optimizers take float64 parameters as their "fp32" main params.

    For numerical verification only: comparing megatron-core against an independent reference
    in float64 removes rounding noise that Adam amplifies by lr/(|g|+eps) for small gradients.
    """
    if not _applied:
        raise RuntimeError("apply() the CPU compatibility layer first")
    _CUDA_TYPE_NAMES[torch.float64] = "torch.cuda.FloatTensor"


def is_applied() -> bool:
    return _applied
