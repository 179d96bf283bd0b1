"""What a run was made with: code commit, package versions, threads, the CPU and the kernels torch
picks for it (recorded in summary.json).

Enough to say whether a re-run can give the same bits: the same commit (and whether the checkout
had uncommitted changes), the same torch / megatron-core / Python, the same intra-op thread count
(CPU reductions split differently over threads), the same device, and on CPU the same vector
capability torch dispatches to (AVX2, AVX512, ...) and the same BLAS and oneDNN builds. Another
CPU model with the same capability runs the same kernels; another capability rounds differently.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("slowqk", "torch", "megatron-core", "deepspeed", "transformer-engine", "numpy")

# keys that must match for a bitwise re-run; the rest (host name, CPU model) are informative
DETERMINING = ("commit", "dirty", "packages", "python", "threads", "device", "kernels")
# the switches that force a lower vector path (torch's dispatch, MKL's, OpenBLAS's)
KERNEL_SWITCHES = (
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "OPENBLAS_CORETYPE",
)


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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernels() -> dict[str, Any]:
    """What decides the CPU kernels' rounding: torch's dispatch capability, the BLAS and oneDNN
    builds, and any switch set to force a lower path."""
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", config)
    onednn = re.search(r"(?:oneDNN|MKL-DNN) (v[\d.]+)", config)
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas.group(1) if blas else None,
        "onednn": onednn.group(1) if onednn else None,
        "switches": {k: os.environ[k] for k in KERNEL_SWITCHES if k in os.environ},
    }


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
        "kernels": kernels(),
        "cpu": cpu_model(),
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
