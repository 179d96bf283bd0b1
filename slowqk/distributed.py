"""Process-group and megatron-core parallel-state setup (torchrun or single process)."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from slowqk import host_memory
from slowqk.config import ParallelConfig
from slowqk.patches import cpu_compat, gloo_shared_device, megatron_fixes, one_rank_collectives


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor: int
    pipeline: int
    data: int
    rank: int


class LayoutError(ValueError):
    pass


def check_layout(world_size: int, tensor: int, pipeline: int) -> int:
    """Data-parallel size for a TP x PP layout; raises naming the numbers when it does not fit."""
    if world_size % (tensor * pipeline):
        raise LayoutError(
            f"world size {world_size} is not divisible by tensor ({tensor}) x pipeline "
            f"({pipeline}) = {tensor * pipeline}; world_size must equal TP x PP x DP"
        )
    return world_size // (tensor * pipeline)


def init_distributed(
    parallel: ParallelConfig, seed: int, port: int | None = None, timeout_s: float | None = None
) -> Layout:
    """Start torch.distributed (gloo on CPU, nccl on GPU) and megatron-core's parallel state;
    ``timeout_s`` bounds how long any rank waits for the others, in every process group."""
    megatron_fixes.apply()
    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.apply()
        host_memory.keep_freed_blocks()  # activations reuse heap blocks, not fresh mmaps
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "gloo":
        one_rank_collectives.apply()  # gloo's threads for a one-rank group slow every operator
        gloo_shared_device.apply()  # one event loop for all groups, not one each
    timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if world == 1 and "MASTER_PORT" not in os.environ and port is None:
            # one process and no launcher: let the store bind any free port itself (picking a
            # "free" port first races with other processes starting at the same moment)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], 0, 1, True)
            os.environ["MASTER_PORT"] = str(store.port)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, **timeout)
        else:
            os.environ.setdefault("MASTER_PORT", str(port or _free_port()))
            dist.init_process_group(backend, rank=rank, world_size=world, **timeout)
    world = dist.get_world_size()
    data = check_layout(world, parallel.tensor, parallel.pipeline)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor,
            pipeline_model_parallel_size=parallel.pipeline,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
            **({} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}),
        )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return Layout(world, parallel.tensor, parallel.pipeline, data, dist.get_rank())


class PeerTimeout(RuntimeError):
    """A peer rank did not answer within ``train.dist_timeout``."""


def is_peer_timeout(exc: BaseException) -> bool:
    """A collective or the rendezvous gave up waiting (gloo: 'Timed out waiting ...'; the store:
    'Timed out after ...'; a peer that died meanwhile: 'Connection closed by peer')."""
    text = str(exc)
    return isinstance(exc, (RuntimeError, dist.DistError)) and (
        "Timed out" in text or "timed out" in text or "Connection closed by peer" in text
    )


LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def single_process_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that is a run of its own (not a rank of ours)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(extra)
    return env


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
