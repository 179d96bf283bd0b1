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

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.serialization import load_common_state_dict
from megatron.core.optimizer import ChainedOptimizer, DistributedOptimizer

from slowqk import faults
from slowqk.hashing import sha256_files

log = logging.getLogger("slowqk.checkpoint")


class CheckpointError(RuntimeError):
    pass


class CheckpointSpaceError(CheckpointError):
    """Not enough space for a checkpoint; nothing of it is left and the previous one stays
    latest."""


LATEST = "latest"
RECORD = "slowqk_checkpoint.json"
DEEPSPEED_COMMON = "slowqk_common.pt"  # run information and scheduler of a DeepSpeed checkpoint
# Optimizer state in a canonical per-parameter layout: loadable at another TP/PP/DP layout.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a synced temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _record_checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_list(ckpt_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(ckpt_dir))
        for p in ckpt_dir.rglob("*")
        if p.is_file() and p.name != RECORD
    )


def _hash_files(ckpt_dir: Path, rels: list[str]) -> dict[str, str]:
    """sha256 of files inside a checkpoint by relative name (split over ranks and threads)."""
    digests = sha256_files([ckpt_dir / rel for rel in rels])
    return {rel: digests[str(ckpt_dir / rel)] for rel in rels}


def write_record(ckpt_dir: Path, step: int, hashes: dict[str, str] | None = None) -> None:
    """List every file of a finished checkpoint with its size and sha256 (``hashes``, or computed
    here). The record is what a later load trusts: nothing unlisted or altered is ever read."""
    rels = _file_list(ckpt_dir)
    hashes = hashes if hashes is not None else _hash_files(ckpt_dir, rels)
    files = {rel: {"bytes": (ckpt_dir / rel).stat().st_size, "sha256": hashes[rel]} for rel in rels}
    record = {"step": step, "files": files}
    record["checksum"] = _record_checksum(record)
    (ckpt_dir / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))


# checkpoints this process verified, keyed by their record and every file's size and mtime: a
# resume after an init_from check, or a load after resolving, does not hash the same bytes twice
_VERIFIED: set[tuple] = set()


def verify_checkpoint(ckpt_dir: Path) -> dict:
    """Check a checkpoint against its record: every file present, of its size, with its sha256
    (the content, whatever the file's size; split over ranks under torch.distributed, where every
    rank must call this). Raises CheckpointError naming the first bad file."""
    path = ckpt_dir / RECORD
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {RECORD} (the save did not finish)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("checksum") != _record_checksum(record):
        raise CheckpointError(f"{path}: checksum mismatch (the record was altered or truncated)")
    stats = []
    for rel, info in record["files"].items():
        f = ckpt_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{ckpt_dir}: missing file {rel}")
        st = f.stat()
        if st.st_size != info["bytes"]:
            raise CheckpointError(f"{f}: {st.st_size} bytes, expected {info['bytes']} (truncated?)")
        stats.append((rel, st.st_size, st.st_mtime_ns))
    key = (str(ckpt_dir.resolve()), record["checksum"], tuple(stats))
    if key in _VERIFIED:
        return record
    hashed = sorted(rel for rel, info in record["files"].items() if info["sha256"] is not None)
    if len(hashed) < len(record["files"]):
        log.warning(
            "%s was saved before every file was hashed: %d large files are checked by size only",
            ckpt_dir,
            len(record["files"]) - len(hashed),
        )
    actual = _hash_files(ckpt_dir, hashed)
    bad = [rel for rel in hashed if actual[rel] != record["files"][rel]["sha256"]]
    if bad:
        raise CheckpointError(
            f"{ckpt_dir / bad[0]}: content differs from the checkpoint record (sha256)"
            + (f", and {len(bad) - 1} more files" if len(bad) > 1 else "")
        )
    _VERIFIED.add(key)
    return record


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_model_state(model_chunks) -> dict:
    return {
        f"model{i}": getattr(chunk, "module", chunk).sharded_state_dict(metadata=SHARDING_METADATA)
        for i, chunk in enumerate(model_chunks)
    }


def _apply_model_state(model_chunks, state: dict) -> None:
    for i, chunk in enumerate(model_chunks):
        getattr(chunk, "module", chunk).load_state_dict(state[f"model{i}"])


def _sharded_state(model_chunks, optimizer, is_loading: bool) -> dict:
    model_sd = _sharded_model_state(model_chunks)
    # the chunks' dicts nested, not merged: each chunk names its layers from 0 (virtual stages)
    return {
        **model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=SHARDING_METADATA
        ),
    }


def _saved_bytes(state: dict) -> int:
    """Bytes this rank's share of ``state`` writes: the main replica of each sharded tensor."""
    total = 0
    for v in nested_values(state):
        if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id) and v.data is not None:
            total += v.data.numel() * v.data.element_size()
    return total


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check_space(ckpt_root: Path, step: int, state_bytes: int, files: dict[str, Path]) -> None:
    """Refuse a save that cannot fit, on every rank alike, before anything is written."""
    here = state_bytes + (
        sum(Path(f).stat().st_size for f in files.values()) if dist.get_rank() == 0 else 0
    )
    needed = torch.tensor([float(here)], dtype=torch.float64)
    dist.all_reduce(needed)  # gloo/nccl sum over the world
    need = needed.item() * 1.05 + 2**20  # metadata, the record and the RNG states
    free = shutil.disk_usage(ckpt_root).free
    short = torch.tensor([1.0 if free < need else 0.0], dtype=torch.float64)
    dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if short.item():
        raise CheckpointSpaceError(
            f"checkpoint at step {step}: {ckpt_root} has {_mib(free)} free, the checkpoint needs "
            f"about {_mib(need)}; nothing was written and {_latest_text(ckpt_root)} stays the "
            "latest; free space and resume"
        )


def _latest_text(ckpt_root: Path) -> str:
    pointer = ckpt_root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else "no checkpoint"


def _is_no_space(exc: BaseException) -> bool:
    """ENOSPC, also as dist_checkpointing re-raises it from its writer ('Worker failure: [Errno
    28]')."""
    return (
        isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    ) or "No space left on device" in str(exc)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model_chunks,
    optimizer,
    scheduler,
    extra: dict[str, Any],
    files: dict[str, Path] | None = None,
) -> Path:
    """Save a megatron-core checkpoint for ``step`` (number of optimizer steps done); with
    ``optimizer=None`` a weights-only one (``train.init_from`` loads it, e.g. an HF import)."""
    if optimizer is None:
        state = _sharded_model_state(model_chunks)
    else:
        state = _sharded_state(model_chunks, optimizer, is_loading=False)
        state["scheduler"] = scheduler.state_dict()
    state["extra"] = {**extra, "step": step}

    def write(tmp: Path) -> None:
        with stop_signals_deferred():
            dist_checkpointing.save(state, str(tmp))

    return save_atomically(ckpt_root, step, write, _saved_bytes(state), files or {})


def save_atomically(
    ckpt_root: Path,
    step: int,
    write: Callable[[Path], None],
    state_bytes: int,
    files: dict[str, Path],
) -> Path:
    """The engine-independent part of a save: space check, ``write(tmp)`` (every rank; the engine
    puts its state there), RNG states, ``files`` copied in, the integrity record, rename, latest.

    ``state_bytes``: what this rank's ``write`` adds (for the space check). ``files`` (name inside
    the checkpoint -> source path) are covered by the record's checksums, e.g. the tokenizer, so a
    checkpoint is self-contained for export.
    """
    try:
        rank = dist.get_rank()
        final = ckpt_root / _iter_name(step)
        tmp = ckpt_root / (_iter_name(step) + ".tmp")
        if rank == 0:
            ckpt_root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        _check_space(ckpt_root, step, state_bytes, files)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        write(tmp)
        # Per-rank RNG states: plain tensors and Python values, read back with weights_only=True.
        torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            for name, src in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / name)
        dist.barrier()
        faults.kill_in_save(step, rank)
        hashes = _hash_files(tmp, _file_list(tmp))  # every rank hashes its share of the files
        if rank == 0:
            write_record(tmp, step, hashes)
            _fsync_tree(tmp)
            old = final.with_name(final.name + ".old.tmp")
            if final.exists():  # re-saving a step: move the old copy aside, never delete it first
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            write_atomic(ckpt_root / LATEST, final.name + "\n")
        dist.barrier()
        return final
    except CheckpointSpaceError:
        raise
    # torch.distributed.checkpoint's CheckpointException is a BaseException
    except BaseException as exc:
        if not _is_no_space(exc):
            raise
        tmp = ckpt_root / (_iter_name(step) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSpaceError(
            f"checkpoint at step {step}: {ckpt_root} ran out of space while writing (No space left "
            f"on device); the partial copy was removed and {_latest_text(ckpt_root)} stays the "
            "latest; free space and resume"
        ) from None


def _candidates(ckpt_root: Path) -> list[Path]:
    """The checkpoint ``latest`` names first, then every other complete-looking one, newest
    first."""
    found = sorted(
        (p for p in ckpt_root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")),
        reverse=True,
    )
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        if not re.fullmatch(
            r"iter_\d{7}", name
        ):  # damaged: the newest complete-looking one is next
            log.warning("%s: holds %r, not a checkpoint name; ignoring it", pointer, name[:40])
            return found
        named = ckpt_root / name
        if named in found:
            found.remove(named)
        found.insert(0, named)
    return found


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint that verifies; older ones are tried, with a warning, if it does not."""
    if not ckpt_root.is_dir():
        return None
    problems = []
    for path in _candidates(ckpt_root):
        try:
            if not path.is_dir():
                raise CheckpointError(
                    f"{ckpt_root / LATEST} names {path.name}, which does not exist"
                )
            verify_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:  # one line: what was skipped and why
            log.warning("using %s, an older checkpoint: %s", path.name, "; ".join(problems))
        return path
    if problems:
        raise CheckpointError(f"no usable checkpoint in {ckpt_root}: " + "; ".join(problems))
    return None


@contextlib.contextmanager
def stop_signals_deferred():
    """Block SIGTERM/SIGUSR1 while megatron-core saves or loads: the helper processes it starts
    (a spawned multiprocessing manager, forked writers) inherit the mask, so a stop signal sent to
    every process of a job (Slurm's --signal, scancel) cannot kill them mid-write. The main process
    gets the signal when the call returns, and the training loop stops at the next step."""
    stop = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside (megatron-core's included) refuses arbitrary pickled objects."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def megatron_checkpoint(source: str | Path, what: str) -> Path:
    """The checkpoint ``source`` names (see :func:`resolve_checkpoint`), refused in one line when
    DeepSpeed wrote it: ``what`` (e.g. ``train.init_from``) reads megatron-core checkpoints."""
    path = resolve_checkpoint(source)
    if checkpoint_engine(path) != "megatron":
        raise ValueError(
            f"{what}: {path} is a DeepSpeed checkpoint; {what} reads megatron-core checkpoints (a "
            "megatron-engine run or an HF import)"
        )
    return path


def checkpoint_engine(path: Path) -> str:
    """Which engine wrote a checkpoint: ``deepspeed`` (its own format) or ``megatron``."""
    return "deepspeed" if (path / DEEPSPEED_COMMON).is_file() else "megatron"


def write_common_state(tmp: Path, state: dict[str, Any]) -> None:
    """The run information and LR scheduler of a checkpoint whose engine has no common state of
    its own (DeepSpeed): plain values, read back with weights_only=True."""
    if dist.get_rank() == 0:
        torch.save(state, tmp / DEEPSPEED_COMMON)


def read_common_state(path: Path) -> dict[str, Any]:
    """The non-tensor part of a checkpoint (run information, LR scheduler), weights-only."""
    if checkpoint_engine(path) == "deepspeed":
        return torch.load(path / DEEPSPEED_COMMON, weights_only=True)
    with weights_only_loads():
        try:
            return load_common_state_dict(str(path))
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: refusing to load non-tensor objects from the checkpoint ({exc})"
            ) from None


def read_extra(path: Path) -> dict[str, Any]:
    """The checkpoint's run information (recipe, step, tokenizer hash) without loading tensors."""
    return read_common_state(path)["extra"]


def _init_empty_optimizer_states(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state to load into; give it placeholder state."""
    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for opt in opts:
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def load_checkpoint(path: Path, model_chunks, optimizer, scheduler) -> dict[str, Any]:
    """Load model, optimizer, scheduler and RNG state; return the checkpoint's ``extra``."""
    _init_empty_optimizer_states(optimizer)
    template = _sharded_state(model_chunks, optimizer, is_loading=True)
    with weights_only_loads(), stop_signals_deferred():
        state = dist_checkpointing.load(template, str(path))
    # scheduler and run information from the common state: megatron-core >= 0.19 returns only what
    # the template asks for, and a template cannot ask for plain values
    common = read_common_state(path)
    _apply_model_state(model_chunks, state)
    optimizer.load_state_dict(state["optimizer"])
    restore_scheduler(scheduler, common["scheduler"])
    load_rng_state(path)
    return common["extra"]


def restore_scheduler(scheduler, state: dict) -> None:
    """The LR schedule as saved (megatron-core's scheduler; it sets the optimizer's lr)."""
    scheduler.num_steps = 0  # load_state_dict *adds* the saved step count to the current one
    scheduler.load_state_dict(state)


def load_rng_state(path: Path) -> None:
    """This rank's RNG states as the checkpoint saved them (none in a weights-only one)."""
    rng_file = path / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run / checkpoints directory (its ``latest``)."""
    path = Path(path)
    if (path / ".metadata").is_file() or (path / DEEPSPEED_COMMON).is_file():
        return path
    for root in (path / "checkpoints", path):
        if (root / "latest").is_file():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise FileNotFoundError(
        f"{path}: no checkpoint here (expected a checkpoint directory or a run with "
        "checkpoints/latest)"
    )


def load_model_weights(path: Path, model_chunks) -> dict[str, Any]:
    """Only the model weights of a checkpoint (any TP/PP layout; resharded on load); returns its
    ``extra``. For ``train.init_from`` and for reading a model back outside training."""
    verify_checkpoint(path)
    with weights_only_loads(), stop_signals_deferred():
        state = dist_checkpointing.load(_sharded_model_state(model_chunks), str(path))
    _apply_model_state(model_chunks, state)
    return read_extra(path)


def remove_leftovers(ckpt_root: Path) -> list[str]:
    """Remove the ``.tmp`` directories interrupted saves left behind (rank 0); their names."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    gone = []
    for leftover in sorted(ckpt_root.glob("iter_*.tmp")):
        shutil.rmtree(leftover, ignore_errors=True)
        gone.append(leftover.name)
    return gone


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep_every: int | None = None) -> None:
    """Keep the newest ``keep_last`` and every multiple of ``keep_every`` (permanent); drop the rest
    and any leftover ``.tmp`` directories of interrupted saves."""
    if dist.get_rank() != 0:
        return
    remove_leftovers(ckpt_root)
    done = sorted(p for p in ckpt_root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        step = int(old.name.split("_")[1])
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)
