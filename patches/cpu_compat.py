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
import functools
import warnings
from typing import Any

import torch
import torch.utils._device  # the device-context factory set (see _patch_tensor_placement)

TESTED_MEGATRON_VERSIONS = ("0.16",)

_applied = False


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


# torch's functions that make tensors and take a ``device``: megatron-core passes
# ``device="cuda"`` to them on its per-step paths (schedules, grad-norm, optimizers).
_FACTORIES = (
    "arange",
    "as_tensor",
    "asarray",
    "empty",
    "empty_like",
    "empty_permuted",
    "empty_strided",
    "eye",
    "full",
    "full_like",
    "linspace",
    "logspace",
    "ones",
    "ones_like",
    "rand",
    "rand_like",
    "randint",
    "randint_like",
    "randn",
    "randn_like",
    "randperm",
    "range",
    "scalar_tensor",
    "tensor",
    "tril_indices",
    "triu_indices",
    "zeros",
    "zeros_like",
)
_TENSOR_FACTORIES = ("new_empty", "new_full", "new_ones", "new_tensor", "new_zeros")


def _on_cpu(func):
    """``func`` with a CUDA ``device=`` keyword made the CPU."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)

    return wrapper


def _patch_tensor_placement() -> None:
    """Every CUDA placement megatron-core asks for lands on the CPU, and ``.type()`` reports CUDA
    names (megatron asserts grads are 'torch.cuda.FloatTensor'). Patched function by function: a
    ``TorchFunctionMode`` doing the same sees every operator (measured: 7-11 ms a step of the
    plain tiny model on 2 cores, ~8%) and stands in torch.compile's way."""
    # ``with torch.device(...)`` places the factories it finds in this cached set. Built now, it
    # holds torch's own functions, which the wrappers call: built after the patch it would hold
    # the wrappers, and Hugging Face's meta-device init would silently build on the CPU.
    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        setattr(torch.Tensor, name, _on_cpu(getattr(torch.Tensor, name)))
    to, type_ = torch.Tensor.to, torch.Tensor.type

    @functools.wraps(to)
    def to_cpu(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = ("cpu", *args[1:])
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    @functools.wraps(type_)
    def cuda_type(self, *args, **kwargs):
        if not args and not kwargs:
            return _CUDA_TYPE_NAMES.get(self.dtype) or type_(self)
        return type_(self, *args, **kwargs)

    torch.Tensor.to = to_cpu
    torch.Tensor.type = cuda_type
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


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
    # deferred: megatron-core is slow to import; only applying the patch needs it
    from megatron.core.tensor_parallel import random as mrandom

    def set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(new_state)

    def get_rng_state(*args: Any, clone: bool = False, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    mrandom._set_cuda_rng_state = set_rng_state
    mrandom._get_cuda_rng_state = get_rng_state
    torch.cuda.random.get_rng_state = get_rng_state


def megatron_version() -> str:
    # deferred: megatron-core is slow to import; only applying the patch needs it
    from megatron.core import package_info

    return package_info.__version__


def apply(force: bool = False) -> bool:
    """Install the CPU compatibility layer. Returns True if it is active after the call."""
    global _applied
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
    _patch_tensor_placement()
    _patch_megatron()
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
