"""sha256 of files, one at a time or many at once split over threads and torch.distributed ranks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sha256_files(paths: Sequence[str | Path]) -> dict[str, str]:
    """``{str(path): sha256}`` for every path. Under torch.distributed every rank must call this
    with the same list: rank r hashes paths r, r + world, ... and all ranks get the whole map.
    Threads within a rank: hashlib releases the GIL while it hashes large reads."""
    keys = [str(p) for p in paths]
    share = keys[dist.get_rank() :: dist.get_world_size()] if _distributed() else keys
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        mine = dict(zip(share, pool.map(file_sha256, share), strict=True))
    if not _distributed():
        return mine
    parts: list[dict[str, str]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}
