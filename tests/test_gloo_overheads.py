"""The two gloo patches: collectives over one rank done in place, and every gloo group on one
transport device. Each changes no training bit, larger groups still reduce, and the groups really
share one event loop."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from conftest import two_layer_overrides
from multiproc import run_ranks


def _without(patch: str | None) -> None:
    """Make init_distributed's call of ``slowqk.patches.<patch>.apply`` do nothing."""
    if patch is not None:
        from importlib import import_module

        import_module(f"slowqk.patches.{patch}").apply = lambda: False


def _event_loops() -> int:
    """Threads of this process that run a gloo device's event loop."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    return names.count("gloo_tcp_loop")


def _train(rank: int, world: int, overrides: list[str], without: str | None) -> dict:
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer
    from slowqk.patches import one_rank_collectives

    from slowqk.config import load_recipe
    from slowqk.distributed import shutdown
    from slowqk.train import Trainer

    _without(without)
    recipe = load_recipe("tiny/gpt", overrides)
    trainer = Trainer(recipe, quiet=True)
    losses = [trainer.train_step()["loss"] for _ in range(4)]
    grad_norm = trainer.train_step()["grad_norm"]
    bound = param_and_grad_buffer.dist_reduce_scatter_func
    loops = _event_loops()
    trainer.metrics.close()
    shutdown()
    return {
        "losses": losses,
        "grad_norm": grad_norm,
        "wrapped": dist.all_reduce.__module__ == one_rank_collectives.__name__,
        "buffer_wrapped": bound.__module__ == one_rank_collectives.__name__,
        "event_loops": loops,
    }


def test_one_rank_collectives_change_no_training_bit(small_dataset, tmp_path) -> None:
    def run(without: str | None) -> dict:
        overrides = two_layer_overrides(small_dataset, tmp_path / f"without-{without}", 4)
        return run_ranks(_train, 1, overrides, without)[0]

    gloo, local = run("one_rank_collectives"), run(None)
    assert not gloo["wrapped"] and local["wrapped"] and local["buffer_wrapped"]
    assert gloo["losses"] == local["losses"]  # bitwise: nothing was ever reduced with anything
    assert gloo["grad_norm"] == local["grad_norm"]


def _collectives(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from slowqk.config import ParallelConfig
    from slowqk.distributed import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=1)
    own = dist.new_group([rank], use_local_synchronization=True)
    x = torch.full((4,), float(rank + 1))
    dist.all_reduce(x)
    alone = torch.full((4,), float(rank + 1))
    dist.all_reduce(alone, group=own)
    scattered = torch.empty(2)
    dist.reduce_scatter_tensor(scattered, torch.arange(4.0) * (rank + 1))
    gathered = torch.empty(4)
    handle = dist.all_gather_into_tensor(gathered, torch.full((2,), float(rank)), async_op=True)
    handle.wait()
    own_gathered = torch.empty(2)
    dist.all_gather_into_tensor(own_gathered, torch.full((2,), float(rank)), group=own)
    shutdown()
    return {
        "sum": x.tolist(),
        "alone": alone.tolist(),
        "scattered": scattered.tolist(),
        "gathered": gathered.tolist(),
        "own_gathered": own_gathered.tolist(),
    }


def test_groups_of_two_ranks_still_reduce() -> None:
    results = run_ranks(_collectives, 2)
    for rank, r in enumerate(results):
        assert r["sum"] == [3.0] * 4
        assert r["alone"] == [float(rank + 1)] * 4
        assert r["scattered"] == [3.0 * v for v in (2 * rank, 2 * rank + 1)]
        assert r["gathered"] == [0.0, 0.0, 1.0, 1.0]
        assert r["own_gathered"] == [float(rank)] * 2


def test_one_gloo_device_changes_no_training_bit(small_dataset, tmp_path) -> None:
    def run(without: str | None) -> dict:
        overrides = two_layer_overrides(small_dataset, tmp_path / f"without-{without}", 4)
        return run_ranks(_train, 2, overrides, without)[0]

    own, shared = run("gloo_shared_device"), run(None)
    assert shared["event_loops"] == 1 and own["event_loops"] > 10  # one a group: ~21
    assert own["losses"] == shared["losses"]  # bitwise: the same reductions, in the same order
    assert own["grad_norm"] == shared["grad_norm"]
