"""Read single tensors out of a megatron-core distributed checkpoint without a process group.

The checkpoint (``torch_dist`` format) stores global tensors; PyTorch's distributed-checkpoint
reader loads one key at a time into a preallocated tensor, so an export holds one stacked
parameter at a time rather than the whole model. Only tensors are read: the common state dict
is read through :func:`slowqk.checkpoint.read_extra` (weights-only unpickling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from slowqk.checkpoint import CheckpointError, read_extra, verify_checkpoint


class CheckpointReadError(ValueError):
    """The checkpoint is incomplete, corrupt or not what the caller expects."""


class CheckpointReader:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise CheckpointReadError(
                f"{self.path}: not a distributed checkpoint (no .metadata file)"
            )
        try:
            verify_checkpoint(self.path)  # every file present, of its recorded size and sha256
        except (CheckpointError, FileNotFoundError) as exc:
            raise CheckpointReadError(str(exc)) from None
        self.extra: dict[str, Any] = read_extra(self.path)
        self._reader = FileSystemReader(str(self.path))
        self._meta = self._reader.read_metadata().state_dict_metadata

    def tensor_keys(self) -> list[str]:
        return [k for k, v in self._meta.items() if hasattr(v, "size")]

    def has(self, key: str) -> bool:
        return key in self._meta

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta[key].size)

    def load(self, key: str) -> torch.Tensor:
        """The global tensor under ``key`` (all TP/PP shards merged)."""
        if key not in self._meta:
            raise CheckpointReadError(f"{self.path}: no tensor {key!r} in the checkpoint")
        meta = self._meta[key]
        out = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        try:
            dcp.load({key: out}, storage_reader=self._reader, no_dist=True)
        except Exception as exc:  # DCP wraps I/O and decode errors in CheckpointException
            raise CheckpointReadError(
                f"{self.path}: reading {key!r} failed: {str(exc).splitlines()[0][:300]}"
            ) from None
        return out
