"""All of a process's gloo process groups on one gloo transport device.

torch gives every gloo process group a TCP device of its own, and every device runs an event-loop
thread that wakes every 10 ms even when nothing is sent. megatron-core makes about 21 process
groups, so each CPU rank was woken about 2,100 times a second; on two cores every wake-up
preempts a thread of the training process's OpenMP team in the middle of an operator (measured,
tiny/gpt: about 100 involuntary context switches a step of the training threads against 8 in
plain PyTorch). A gloo device takes any number of contexts, so the groups share one, made the
way torch makes its own (``GLOO_SOCKET_IFNAME`` honoured): one loop thread, 100 wake-ups a second.

Applied before the first process group is made (torch checks a group's backend against the class
it names, so the default group must come from the subclass too).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d

_devices: tuple[int, list] | None = None  # (the process that made them, the devices)


def _shared_devices() -> list:
    global _devices
    if _devices is None or _devices[0] != os.getpid():  # a forked child makes its own
        gloo = distributed_c10d.ProcessGroupGloo
        names = [n for n in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n]
        made = [gloo.create_device(interface=n) for n in names] or [gloo.create_default_device()]
        _devices = (os.getpid(), made)
    return _devices[1]


def apply() -> bool:
    """Make every later gloo process group share this process's devices. True once applied;
    False where there is no gloo or groups exist already (they keep their own devices)."""
    if not dist.is_gloo_available():
        return False
    base = distributed_c10d.ProcessGroupGloo
    if getattr(base, "_shares_devices", False):
        return True
    if dist.is_initialized():
        return False

    class ProcessGroupGloo(base):
        _shares_devices = True

        def __init__(self, store, rank: int, size: int, timeout=timedelta(minutes=30)) -> None:
            options = base._Options()
            options._timeout = timeout
            options._devices = _shared_devices()
            options._threads = 2 * len(options._devices)  # torch's own default
            super().__init__(store, rank, size, options)

    distributed_c10d.ProcessGroupGloo = ProcessGroupGloo
    return True
