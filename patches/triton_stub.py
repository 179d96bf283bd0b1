"""A stand-in ``triton`` module for CPU machines without it.

megatron-core 0.19 imports triton at module level in code the GPT model never runs on CPU (MoE
paged stash, Mamba kernels): ``import triton`` then ``@triton.jit`` definitions. Without the 286 MB
wheel that import fails before anything runs. The stand-in makes those definitions importable;
calling any of its kernels raises. Installed only when triton cannot be imported and CUDA is absent.
"""

from __future__ import annotations

import importlib.util
import sys
import types


class _Placeholder:
    """Whatever a triton attribute is asked for at definition time: a decorator, a type, a value."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:  # @triton.jit / @triton.autotune(...)(fn)
            return _Kernel(args[0])
        return _Placeholder(f"{self._name}(...)")

    def __getattr__(self, name: str) -> _Placeholder:
        return _Placeholder(f"{self._name}.{name}")

    def __getitem__(self, key) -> _Placeholder:
        return _Placeholder(f"{self._name}[...]")


class _Kernel:
    def __init__(self, fn) -> None:
        self.fn = fn

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"triton kernel {self.fn.__name__} called, but triton is not installed (CPU machine)")


def _module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__getattr__ = lambda attr: _Placeholder(f"{name}.{attr}")  # type: ignore[method-assign]
    mod.__path__ = []  # a package: `import triton.language` works
    mod.__version__ = "0.0.0+slowqk-stub"
    return mod


def needed() -> bool:
    """megatron-core >= 0.19 without triton on a machine without CUDA. (Older lines import triton
    only inside try blocks; a stand-in there would make them believe it is installed.)"""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("megatron-core").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    if (major, minor) < (0, 19) or "triton" in sys.modules or importlib.util.find_spec("triton") is not None:
        return False
    import torch

    return not torch.cuda.is_available()


def apply() -> bool:
    """Install the stand-in when :func:`needed`; True if it was installed."""
    if not needed():
        return False
    root = _module("triton")
    for sub in ("language", "runtime", "compiler", "testing"):
        child = _module(f"triton.{sub}")
        setattr(root, sub, child)
        sys.modules[f"triton.{sub}"] = child
    root.jit = _Placeholder("triton.jit")
    sys.modules["triton"] = root
    return True
