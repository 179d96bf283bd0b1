"""What a model really holds: the bytes autograd saves for the backward pass during a forward,
and the bytes of parameters, gradient buffers and optimizer state as allocated.

The saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor an
operation saves for backward passes through the hook, and its storage counts once (a view shares
its base's storage; an input saved by two operations is one allocation). Parameters, and views of
them, are weights rather than activations and are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class SavedBytes:
    """Bytes saved for backward, by where the forward was when they were saved."""

    by_label: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_label.values())

    def get(self, label: str) -> int:
        return self.by_label.get(label, 0)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def count_saved_for_backward(
    forward: Callable[[], object],
    weights: Iterable[torch.Tensor],
    regions: dict[str, torch.nn.Module],
) -> tuple[object, SavedBytes]:
    """Run ``forward()`` counting what autograd saves. ``regions`` names modules: a tensor saved
    while one of them runs counts under its name (the innermost region wins), anything else under
    ``"other"``. Returns the forward's result and the counts."""
    skip = {_storage_key(w) for w in weights}
    seen: set[tuple[str, int]] = set()
    counts = SavedBytes()
    stack: list[str] = []
    handles = []

    def leave(*_) -> None:
        stack.pop()

    for name, module in regions.items():
        handles.append(module.register_forward_pre_hook(lambda *_, n=name: stack.append(n)))
        handles.append(module.register_forward_hook(leave, always_call=True))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            key = _storage_key(t)
            if key not in skip and key not in seen:
                seen.add(key)
                label = stack[-1] if stack else "other"
                nbytes = t.untyped_storage().nbytes()
                counts.by_label[label] = counts.by_label.get(label, 0) + nbytes
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = forward()
    finally:
        for h in handles:
            h.remove()
    return result, counts


def allocated_state_bytes(chunks: list[torch.nn.Module], optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters (megatron-core's contiguous buffer where there is
    one), gradients (its gradient buffers) and optimizer state (Adam's moments, fp32 main
    weights where the model's are 16-bit; the per-parameter step counters left out)."""
    params = grads = 0
    model_storages = set()
    for chunk in chunks:
        for buffer in chunk.buffers:
            grads += buffer.grad_data.numel() * buffer.grad_data.element_size()
            if buffer.param_data is not None:
                params += buffer.param_data.numel() * buffer.param_data.element_size()
                model_storages.add(_storage_key(buffer.param_data))
        for p in chunk.parameters():
            key = _storage_key(p)
            if key not in model_storages:
                params += p.numel() * p.element_size()
                model_storages.add(key)
    state, counted = 0, set(model_storages)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        tensors = [p for group in inner.param_groups for p in group["params"]]
        tensors += [v for s in inner.state.values() for k, v in s.items() if k != "step"]
        for tensor in tensors:
            key = _storage_key(tensor)
            if torch.is_tensor(tensor) and key not in counted:
                counted.add(key)
                state += tensor.numel() * tensor.element_size()
    return {"parameters": params, "gradients": grads, "optimizer": state}
