"""Run a function on N gloo ranks from pytest (one process per rank, spawned fresh)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    import torch

    import slowqk  # noqa: F401 - first: its import-time shims must precede megatron-core's import
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        err = None
    except BaseException:  # report to the parent, which re-raises with the rank's traceback
        result, err = None, traceback.format_exc()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps((result, err)))
    if err is not None:
        os._exit(1)


def run_ranks(fn: Callable, world: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world, *args)`` in ``world`` spawned processes; return each rank's result."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_entry, args=(world, _free_port(), out, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
        crash = None
        try:
            while not ctx.join():
                pass
        except ProcessException as exc:
            crash = exc
        results = []
        for r in range(world):
            path = Path(out, f"rank{r}.pkl")
            if not path.exists():
                continue
            # written by our own child process, never by an outside party
            result, err = pickle.loads(path.read_bytes())
            if err is not None:
                raise RuntimeError(f"rank {r} failed:\n{err}")
            results.append(result)
        if crash is not None or len(results) != world:
            raise RuntimeError(f"a rank died without reporting: {crash}")
        return results
