"""Checkpoints through megatron-core ``dist_checkpointing``, written atomically.

Layout of ``<run>/checkpoints``::

    iter_0000010/        a complete checkpoint (model + optimizer shards, common state)
    iter_0000010.tmp/    being written; never read
    latest               text file naming the newest complete checkpoint, replaced atomically

A checkpoint directory gets its final name only after every rank finished writing (barrier,
fsync, then rename on rank 0), and ``latest`` is updated last, so a crash at any point leaves the
previous checkpoint as "latest".
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

LATEST = "latest"
# Optimizer state in a canonical per-parameter layout: loadable at another TP/PP/DP layout.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        # as tensors and Python scalars so torch.load(weights_only=True) can read it back
        "numpy": _numpy_state_to_torch(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _numpy_state_to_torch(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model_chunks, optimizer, is_loading: bool) -> dict:
    model_sd = {}
    for i, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)
        model_sd[f"model{i}"] = module.sharded_state_dict(metadata=SHARDING_METADATA)
    merged = {k: v for sd in model_sd.values() for k, v in sd.items()}
    return {
        **model_sd,
        "optimizer": optimizer.sharded_state_dict(merged, is_loading=is_loading, metadata=SHARDING_METADATA),
    }


def save_checkpoint(
    ckpt_root: Path, step: int, model_chunks, optimizer, scheduler, extra: dict[str, Any]
) -> Path:
    """Save a complete checkpoint for ``step`` (number of optimizer steps done)."""
    rank = dist.get_rank()
    final = ckpt_root / _iter_name(step)
    tmp = ckpt_root / (_iter_name(step) + ".tmp")
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict()
    state["extra"] = {**extra, "step": step}
    dist_checkpointing.save(state, str(tmp))
    # Per-rank RNG states: plain tensors and Python values, read back with weights_only=True.
    torch.save(_rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(ckpt_root / LATEST, final.name + "\n")
    dist.barrier()
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = ckpt_root / name
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {name!r}, which does not exist in {ckpt_root}")
    return path


def _init_empty_optimizer_states(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state to load into; give it placeholder state."""
    from megatron.core.optimizer import ChainedOptimizer, DistributedOptimizer

    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for opt in opts:
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def load_checkpoint(path: Path, model_chunks, optimizer, scheduler) -> dict[str, Any]:
    """Load model, optimizer, scheduler and RNG state; return the checkpoint's ``extra``."""
    _init_empty_optimizer_states(optimizer)
    template = _sharded_state(model_chunks, optimizer, is_loading=True)
    template["scheduler"] = None
    template["extra"] = None
    state = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(model_chunks):
        getattr(chunk, "module", chunk).load_state_dict(state[f"model{i}"])
    optimizer.load_state_dict(state["optimizer"])
    # load_state_dict *adds* the saved step count to the current one
    scheduler.num_steps = 0
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state["extra"]


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    if dist.get_rank() != 0:
        return
    done = sorted(p for p in ckpt_root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
