"""Fault injection points for the fault-tolerance tests, driven by environment variables.

Each point does nothing unless its variable is set, so production runs are unaffected:

- ``SLOWQK_FAULT_KILL_AT_STEP=N``: rank 0 kills itself (SIGKILL) right after step N.
- ``SLOWQK_FAULT_KILL_IN_SAVE=N``: rank 0 kills itself while writing the checkpoint of step N,
  after the shards are written and before the checkpoint is complete.
- ``SLOWQK_FAULT_NAN_AT_STEPS=a,b,...``: the loss of those steps (0-based) becomes NaN.
- ``SLOWQK_FAULT_KILL_AFTER_SHARDS=N``: the shard builder kills itself after N shards.
"""

from __future__ import annotations

import os
import signal


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(step: int, rank: int) -> None:
    if rank == 0 and _env_int("SLOWQK_FAULT_KILL_AT_STEP") == step:
        kill_self()


def kill_in_save(step: int, rank: int) -> None:
    if rank == 0 and _env_int("SLOWQK_FAULT_KILL_IN_SAVE") == step:
        kill_self()


def nan_steps() -> set[int]:
    value = os.environ.get("SLOWQK_FAULT_NAN_AT_STEPS", "")
    return {int(x) for x in value.split(",") if x.strip()}
