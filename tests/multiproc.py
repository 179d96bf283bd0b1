"""Run a function on N gloo ranks, or the CLI as one launcher-started rank, from pytest.

Ranks are forked from a forkserver that has already imported torch, megatron-core and SlowQK:
each rank then starts in well under a second instead of paying those imports again, while still
getting a clean process (the server itself never runs a model, a thread pool or a process group).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

# slowqk first: its import-time shims must precede megatron-core's import
_PRELOAD = [
    "slowqk",
    "slowqk.train",
    "slowqk.models",
    "slowqk.checkpoint",
    "slowqk.cli",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.models.gpt",
    "multiproc",
]
multiprocessing.set_forkserver_preload(_PRELOAD)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port() -> int:
    """A free port for rank 0's store: below the kernel's ephemeral range (where every other
    connection, other tests' ranks included, takes its port) and in a block of its own per xdist
    worker, so nothing can take it between this check and rank 0's bind."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    block = 2000
    lo = max(1024, _ephemeral_low() - block * (worker % 8 + 1))
    for port in random.sample(range(lo, lo + block), block):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{lo + block - 1}")


def _adopt_environment(env: dict[str, str]) -> None:
    """Make ``env`` this child's whole environment: the caller's at the time of the call, as spawn
    would pass it (the server's own is from when it started), and its thread count (the server's
    torch read OMP_NUM_THREADS already)."""
    os.environ.clear()
    os.environ.update(env)
    import torch

    import slowqk  # noqa: F401 - first: its import-time shims must precede megatron-core's import

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))


def _entry(
    rank: int, world: int, port: int, out_dir: str, env: dict[str, str], fn: Callable, args: tuple
) -> None:
    _adopt_environment(
        {
            **env,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
    )
    try:
        result = fn(rank, world, *args)
        err = None
    except BaseException:  # report to the parent, which re-raises with the rank's traceback
        result, err = None, traceback.format_exc()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps((result, err)))
    if err is not None:
        os._exit(1)


def run_ranks(fn: Callable, world: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world, *args)`` in ``world`` fresh processes; return each rank's result."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _entry,
            args=(world, _free_port(), out, dict(os.environ), fn, args),
            nprocs=world,
            join=False,
            start_method="forkserver",
        )
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


def _cli_entry(
    argv: list[str], env: dict[str, str], log_path: str, out_path: str | None, cwd: str | None
) -> None:
    # the process a launcher would start: its own environment and directory, stdout to out_path
    # (dropped when None), stderr to log_path
    _adopt_environment(env)
    if cwd is not None:
        os.chdir(cwd)
    os.dup2(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    out = os.devnull if out_path is None else out_path
    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
    from slowqk.cli import main

    sys.exit(main(argv))


class CliProcess:
    """``python -m slowqk.cli ARGV`` as a forked process (what ``subprocess.Popen`` offers that the
    fault tests use: pid, poll, returncode, send_signal, kill); exit codes as Popen gives them."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: str,
        out_path: str | None = None,
        cwd: str | None = None,
    ) -> None:
        self._proc = multiprocessing.get_context("forkserver").Process(
            target=_cli_entry, args=(argv, env, log_path, out_path, cwd), daemon=False
        )
        self._proc.start()
        self.pid = self._proc.pid
        # The forkserver sends the exit status once, over the sentinel: two threads polling at
        # the same moment (a fault test's watcher and the launcher's loop) would both read, and
        # the second one's EOF becomes exit code 255. One reader at a time; the status is cached.
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            return self._proc.exitcode

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            # it may end (and the forkserver reap it) between the poll and the signal
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        multiprocessing.connection.wait([self._proc.sentinel], timeout)  # without the lock
        return self.poll()


def run_cli(
    argv: list[str],
    cwd: str | Path | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python -m slowqk.cli ARGV`` in a forked process (``env``: variables set on top of this
    one's), as ``subprocess.run(..., capture_output=True, text=True)`` would return it."""
    with tempfile.TemporaryDirectory() as tmp:
        err, out = f"{tmp}/stderr", f"{tmp}/stdout"
        where = None if cwd is None else str(cwd)
        proc = CliProcess(argv, {**os.environ, **(env or {})}, err, out, where)
        if proc.wait(timeout) is None:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(["slowqk", *argv], timeout)
        return subprocess.CompletedProcess(
            ["slowqk", *argv], proc.returncode, Path(out).read_text(), Path(err).read_text()
        )
