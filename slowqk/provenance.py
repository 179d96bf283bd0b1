"""What a run was made with: code commit, package versions, threads (recorded in summary.json).

Enough to re-run a listed run and expect the same bits: the same commit (and whether the checkout
had uncommitted changes), the same torch / megatron-core / Python, the same intra-op thread count
(CPU reductions split differently over threads) and the same device.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("slowqk", "torch", "megatron-core", "deepspeed", "transformer-engine", "numpy")

# keys that must match for a bitwise re-run; the rest (host name, time) are informative
DETERMINING = ("commit", "dirty", "packages", "python", "threads", "device")


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provenance() -> dict[str, Any]:
    """This process's code and environment, as recorded beside every run's results."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    )
    return {
        # None: not run from a git checkout (an installed wheel: see packages.slowqk)
        "commit": commit,
        "dirty": bool(status) if commit else None,
        "packages": {name: v for name in PACKAGES if (v := _version(name)) is not None},
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": device,
        "host": platform.node(),
    }


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: recorded -> now`` for each field that decides the bits and differs."""
    out = []
    for key in DETERMINING:
        a, b = recorded.get(key), current.get(key)
        if key == "packages":
            for name in sorted((a or {}).keys() | (b or {}).keys()):
                if (a or {}).get(name) != (b or {}).get(name):
                    out.append(f"{name}: {(a or {}).get(name)} -> {(b or {}).get(name)}")
        elif a != b:
            out.append(f"{key}: {a} -> {b}")
    return out
