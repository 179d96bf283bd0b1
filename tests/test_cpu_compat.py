"""The CPU compatibility layer: what it redirects, and that it stays off when CUDA is present."""

from __future__ import annotations

import torch
from multiproc import run_ranks


def _probe(rank: int, world: int) -> dict:
    from slowqk.patches import cpu_compat

    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is True  # idempotent
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    from slowqk.config import ParallelConfig
    from slowqk.distributed import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=1)

    t = torch.zeros(3, device="cuda")
    model_parallel_cuda_manual_seed(7)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(2)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(2)
    outside = torch.rand(2)
    shutdown()
    from torch.overrides import _get_current_function_mode_stack

    with torch.device("meta"):  # torch's device context still places the patched factories
        in_context = [torch.tensor([]), torch.empty(2), torch.arange(3), torch.zeros(1)]
    made = [
        torch.arange(3, device="cuda"),
        torch.tensor([1.0], device=torch.device("cuda", 0)),
        torch.full((2,), 1.0, device="cuda:0"),
        torch.ones(1).new_zeros(2, device="cuda"),
        torch.empty(2).to(device="cuda"),
    ]
    return {
        "modes": len(_get_current_function_mode_stack()),  # none: a mode sees every operator
        "in_context": sorted({str(m.device) for m in in_context}),
        "made": sorted({str(m.device) for m in made}),
        "device": str(t.device),
        "moved": str(torch.ones(1).cuda().device),
        "to": str(torch.ones(1).to("cuda").device),
        "type": torch.ones(1).type(),
        "type_bf16": torch.ones(1, dtype=torch.bfloat16).type(),
        "current_device": str(torch.cuda.current_device()),
        "fork_differs": not torch.equal(a, b),  # the tracker's stream advances inside fork()
        "fork_separate": not torch.equal(a, outside),
    }


def test_cuda_calls_are_redirected_to_cpu() -> None:
    r = run_ranks(_probe, 1)[0]
    assert r["device"] == r["moved"] == r["to"] == "cpu"
    assert r["type"] == "torch.cuda.FloatTensor" and r["type_bf16"] == "torch.cuda.BFloat16Tensor"
    assert r["current_device"] == "cpu"
    assert r["modes"] == 0 and r["made"] == ["cpu"] and r["in_context"] == ["meta"]
    assert r["fork_differs"] and r["fork_separate"]


def test_not_applied_when_cuda_is_available(monkeypatch) -> None:
    from slowqk.patches import cpu_compat

    if cpu_compat.is_applied():  # pragma: no cover - only if a test applied it in-process
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.apply() is False
    assert not cpu_compat.is_applied()
